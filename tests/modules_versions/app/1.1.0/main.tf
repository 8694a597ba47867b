# Test module, version 1.1.0: adds an optional `tags` variable and a resource for them,
# whose creation fails for an instance named "bad" (a failure at apply time, not plan).

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

variable "tags" {
  type    = map(string)
  default = {}
}

resource "terraform_data" "this" {
  input = "${var.name}-${var.size}"
}

resource "terraform_data" "tags" {
  input = var.tags

  provisioner "local-exec" {
    command = var.name == "bad" ? "exit 1" : "true"
  }
}

output "id" {
  value = terraform_data.this.output
}

output "version" {
  value = "1.1.0"
}
