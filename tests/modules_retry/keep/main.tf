# Test module for orphaning: its destroy runs a provisioner that writes `marker`, so a
# test can see that no destroy ran.

variable "marker" {
  type = string
}

resource "terraform_data" "this" {
  input = var.marker

  provisioner "local-exec" {
    when    = destroy
    command = "echo destroyed >> '${self.input}'"
  }
}

output "marker" {
  value = var.marker
}
