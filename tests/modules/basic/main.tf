# Test module: every type the schema generator handles, a sensitive variable whose failed
# validation message repeats its value, and a sensitive output.

variable "name" {
  type = string
}

variable "count_of" {
  type    = number
  default = 1
}

variable "enabled" {
  type    = bool
  default = true
}

variable "labels" {
  type    = map(string)
  default = {}
}

variable "zones" {
  type    = set(string)
  default = []
}

variable "pair" {
  type    = tuple([string, number])
  default = ["a", 1]
}

variable "spec" {
  type = object({
    tier  = string
    disks = optional(list(object({ size = number, kind = optional(string, "ssd") })), [])
  })
  default = { tier = "small" }
}

variable "anything" {
  type    = any
  default = null
}

variable "token" {
  type      = string
  sensitive = true
  default   = "default-token-value"

  validation {
    condition     = length(var.token) >= 12
    error_message = "The token ${var.token} is too short."
  }
}

variable "strict_nonnull" {
  type     = string
  default  = "x"
  nullable = false
}

resource "terraform_data" "this" {
  input = {
    name  = var.name
    count = var.count_of
    spec  = var.spec
  }
}

output "id" {
  value = terraform_data.this.id
}

output "name" {
  value = var.name
}

output "spec" {
  value = var.spec
}

output "token_out" {
  value     = var.token
  sensitive = true
}
