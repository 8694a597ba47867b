# Test module for references: takes network's outputs (one sensitive), and refuses a
# network id that has "bad" in it (a dependent a cascade cannot apply).

variable "network_id" {
  type = string

  validation {
    condition     = !strcontains(var.network_id, "bad")
    error_message = "This network id is refused."
  }
}

variable "zone" {
  type    = string
  default = "a"
}

variable "token" {
  type      = string
  sensitive = true
  default   = "subnet-default-token"
}

variable "plain" {
  type    = string
  default = ""
}

resource "terraform_data" "subnet" {
  input = "${var.network_id}/${var.zone}"
}

output "subnet_id" {
  value = "subnet-${terraform_data.subnet.output}"
}

output "token" {
  value     = var.token
  sensitive = true
}
