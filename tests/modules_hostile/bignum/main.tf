# Test module: an output longer than Python's default limit for int() (4,300 digits), made
# from a string since the inputs themselves are bounded far below it.

variable "thousands" {
  type        = number
  description = "Zeros after the 1, in thousands."
}

resource "terraform_data" "this" {
  input = var.thousands
}

locals {
  zeros = join("", [for i in range(1000) : "0"])
}

output "big" {
  value = tonumber("1${join("", [for i in range(terraform_data.this.output) : local.zeros])}")
}
