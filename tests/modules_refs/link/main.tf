# Test module for references: one link of a chain (`up` takes the previous link's id;
# `side` a second reference, for cycles).

variable "up" {
  type    = string
  default = "root"
}

variable "side" {
  type    = string
  default = ""
}

output "id" {
  value = "link-${length(var.up)}${var.side == "" ? "" : "-"}"
}
