# Test module for references: the end of network -> subnet -> app; takes subnet's id and
# its sensitive token.

variable "subnet_id" {
  type = string
}

variable "token" {
  type      = string
  sensitive = true
  default   = "app-default-token"
}

variable "replicas" {
  type    = number
  default = 1
}

variable "labels" {
  type    = map(string)
  default = {}
}

resource "terraform_data" "app" {
  input = var.subnet_id
}

output "url" {
  value = "https://${terraform_data.app.output}.example"
}

output "token_length" {
  value = length(nonsensitive(var.token))
}

variable "fail" {
  type        = bool
  default     = false
  description = "Fail the apply once it started (a provisioner that exits 1)."
}

resource "terraform_data" "check" {
  triggers_replace = [var.fail]

  provisioner "local-exec" {
    command = var.fail ? "exit 1" : "true"
  }
}

output "token_echo" {
  value       = nonsensitive(var.token)
  description = "The token, told not to be sensitive: the server scrubs it all the same."
}
