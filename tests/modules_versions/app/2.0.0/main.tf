# Test module, version 2.0.0: drops `legacy`, adds a required `owner`, makes `size` a
# number, and replaces its resource (a new trigger).

variable "name" {
  type = string
}

variable "size" {
  type    = number
  default = 1
}

variable "owner" {
  type = string
}

resource "terraform_data" "this" {
  input            = "${var.name}-${var.size}"
  triggers_replace = ["v2", var.owner]
}

output "id" {
  value = terraform_data.this.output
}

output "version" {
  value = "2.0.0"
}
