# Test module for references: one link of a chain (`up` takes the previous link's id).

variable "up" {
  type    = string
  default = "root"
}

output "id" {
  value = "link-${length(var.up)}"
}
