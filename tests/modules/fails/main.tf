# Test module: plans fine, then the apply fails the way a cloud API error would.

variable "secret" {
  type      = string
  sensitive = true
  default   = "fails-default-secret"
}

resource "terraform_data" "this" {
  input = var.secret

  provisioner "local-exec" {
    command = "echo 'the cloud said no' >&2; exit 3"
  }
}
