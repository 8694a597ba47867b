# Test module for retries: the apply fails while the file `gate` names is missing (a
# provider's hiccup), and succeeds once it exists; `journal` records each run's start and
# end so tests can see runs one after another.

variable "gate" {
  type = string
}

variable "seconds" {
  type    = number
  default = 0
}

variable "tag" {
  type    = string
  default = "run"
}

variable "journal" {
  type    = string
  default = ""
}

locals {
  note = var.journal == "" ? "true" : "echo \"$1 ${var.tag} $(date +%s.%N)\" >> '${var.journal}'"
}

resource "terraform_data" "this" {
  triggers_replace = [var.tag, var.gate]

  provisioner "local-exec" {
    command = "note() { ${local.note}; }; note start; sleep ${var.seconds}; note end; test -f '${var.gate}'"
  }
}

output "tag" {
  value = var.tag
}
