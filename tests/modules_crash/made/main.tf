# Test module: the resource is made by a slow call (it sleeps, then writes a line to a
# marker file): a test kills the server mid-call and checks the state records it once.

variable "marker" {
  type        = string
  description = "File each creation appends a line to."
}

variable "seconds" {
  type    = number
  default = 2
}

resource "terraform_data" "this" {
  input = var.marker

  provisioner "local-exec" {
    command = "sleep ${var.seconds}; echo made >> '${var.marker}'"
  }
}

output "marker" {
  value = terraform_data.this.output
}
