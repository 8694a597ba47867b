# Test module for approvals: each apply of a new `tag` replaces the resource, whose
# provisioner appends "apply <tag>" to `journal` (so a test counts the applies that ran);
# its destroy appends "destroy <tag>". `secret` is sensitive: it must never show in a plan
# summary, an event or a record.

variable "tag" {
  type = string
}

variable "journal" {
  type = string
}

variable "seconds" {
  type    = number
  default = 0
}

variable "secret" {
  type      = string
  sensitive = true
  default   = "gated-default-secret"
}

resource "terraform_data" "this" {
  triggers_replace = [var.tag]
  input            = { tag = var.tag, journal = var.journal }

  provisioner "local-exec" {
    command = "sleep ${var.seconds}; echo 'apply ${var.tag}' >> '${var.journal}'"
  }

  provisioner "local-exec" {
    when    = destroy
    command = "echo 'destroy ${self.input.tag}' >> '${self.input.journal}'"
  }
}

resource "terraform_data" "hidden" {
  input = sensitive(var.secret)
}

output "tag" {
  value = var.tag
}
