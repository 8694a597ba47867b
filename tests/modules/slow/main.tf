# Test module: each apply replaces the resource and runs a command that records when it
# started and ended, then sleeps, so tests can see whether runs overlap.

variable "seconds" {
  type    = number
  default = 1
}

variable "journal" {
  type        = string
  description = "File the run appends its start and end times to."
}

variable "tag" {
  type    = string
  default = "run"
}

resource "terraform_data" "this" {
  triggers_replace = [timestamp()]

  provisioner "local-exec" {
    command = "echo \"start ${var.tag} $(date +%s.%N)\" >> '${var.journal}'; sleep ${var.seconds}; echo \"end ${var.tag} $(date +%s.%N)\" >> '${var.journal}'"
  }
}

output "tag" {
  value = var.tag
}
