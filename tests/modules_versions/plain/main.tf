# Test module without versions.

variable "name" {
  type    = string
  default = "x"
}

resource "terraform_data" "this" {
  input = var.name
}

output "id" {
  value = terraform_data.this.output
}
