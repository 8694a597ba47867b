# Test module for what failed and canceled creates leave: a first resource that sleeps
# (time to cancel in before anything exists), then a second that sleeps too (time to
# cancel in once the first exists) and fails when asked.

variable "seconds" {
  type    = number
  default = 0
}

variable "then_seconds" {
  type    = number
  default = 0
}

variable "fail" {
  type    = bool
  default = false
}

resource "terraform_data" "first" {
  provisioner "local-exec" {
    command = "sleep ${var.seconds}"
  }
}

resource "terraform_data" "second" {
  depends_on = [terraform_data.first]

  provisioner "local-exec" {
    command = "sleep ${var.then_seconds}; ${var.fail ? "echo the second resource fails >&2; exit 1" : "true"}"
  }
}

output "made" {
  value = terraform_data.first.id
}
