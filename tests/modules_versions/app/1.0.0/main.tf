# Test module, version 1.0.0: one terraform_data named after its inputs.

variable "name" {
  type = string
}

variable "size" {
  type    = string
  default = "s"
}

variable "legacy" {
  type    = string
  default = "old"
}

resource "terraform_data" "this" {
  input = "${var.name}-${var.size}"
}

output "id" {
  value = terraform_data.this.output
}

output "version" {
  value = "1.0.0"
}
