# Test module for references: the root of network -> subnet -> app. Its outputs are a
# plain id, a nested list (a pointer goes into it) and a sensitive token.

variable "name" {
  type    = string
  default = "main"
}

variable "token" {
  type      = string
  sensitive = true
  default   = "network-token-0001"
}

resource "terraform_data" "net" {
  input = var.name
}

output "network_id" {
  value = "net-${terraform_data.net.output}"
}

output "subnets" {
  value = [{ id = "sn-${terraform_data.net.output}-a", zone = "a" }, { id = "sn-${terraform_data.net.output}-b", zone = "b" }]
}

output "size" {
  value = 16
}

output "token" {
  value     = "${var.token}-${terraform_data.net.output}"
  sensitive = true
}
