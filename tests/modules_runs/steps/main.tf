# Test module for runs: three resources one after another, each running a command that
# sleeps, so an apply has progress to follow, time to cancel in, and an order to check.
# A sensitive variable reaches a resource, an output and a validation message.

variable "seconds" {
  type    = number
  default = 1
}

variable "tag" {
  type    = string
  default = "run"
}

variable "journal" {
  type        = string
  default     = ""
  description = "File the run appends its start and end to (none when empty)."
}

variable "secret" {
  type      = string
  sensitive = true
  default   = "steps-default-secret"

  validation {
    condition     = length(var.secret) >= 8
    error_message = "The secret ${var.secret} is too short."
  }
}

locals {
  note = var.journal == "" ? "true" : "echo \"$1 ${var.tag} $(date +%s.%N)\" >> '${var.journal}'"
}

resource "terraform_data" "first" {
  triggers_replace = [timestamp()]

  provisioner "local-exec" {
    command = "note() { ${local.note}; }; note start; sleep ${var.seconds}"
  }
}

resource "terraform_data" "second" {
  triggers_replace = [timestamp()]
  depends_on       = [terraform_data.first]

  provisioner "local-exec" {
    command = "sleep ${var.seconds}"
  }
}

resource "terraform_data" "third" {
  triggers_replace = [timestamp()]
  depends_on       = [terraform_data.second]
  input            = var.secret

  provisioner "local-exec" {
    command = "note() { ${local.note}; }; sleep ${var.seconds}; note end"
  }
}

output "tag" {
  value = var.tag
}

output "secret_out" {
  value     = var.secret
  sensitive = true
}
