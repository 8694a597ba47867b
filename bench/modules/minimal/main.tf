# The smallest useful module: one variable, one terraform_data, one output (the shape
# FACTS.md measured raw terraform on).

variable "name" {
  type = string
}

resource "terraform_data" "this" {
  input = var.name
}

output "name" {
  value = terraform_data.this.output
}
