# Test module for the OpenAPI tests: every shape of variable the schema generator knows,
# so values generated from its published schema can be checked against terraform itself.
# Built from terraform_data only: it runs offline.

variable "name" {
  type        = string
  description = "A plain required string, checked by a validation block."

  validation {
    condition     = try(length(var.name), 0) <= 200
    error_message = "The name must be at most 200 characters."
  }
}

variable "ratio" {
  type        = number
  default     = 0.5
  description = "A number with a default."
}

variable "flag" {
  type     = bool
  default  = true
  nullable = false
}

variable "tags" {
  type    = map(string)
  default = {}
}

variable "zones" {
  type    = set(string)
  default = []
}

variable "pair" {
  type    = tuple([string, number, bool])
  default = ["a", 1, true]
}

variable "matrix" {
  type    = list(list(number))
  default = []
}

variable "spec" {
  type = object({
    tier = string
    size = optional(number, 1)
    disks = optional(list(object({
      gb   = number
      kind = optional(string, "ssd")
    })), [])
    labels = optional(map(string))
    extra  = optional(any)
  })
  default     = { tier = "small" }
  description = "Nested objects with optional attributes and defaults."
}

variable "ports" {
  type = map(object({
    port   = number
    public = optional(bool, false)
  }))
  default = {}
}

variable "anything" {
  type    = any
  default = null
}

variable "password" {
  type      = string
  default   = null
  sensitive = true

  validation {
    condition     = try(length(var.password), 0) < 10000
    error_message = "The password must be shorter than 10000 characters."
  }
}

variable "secrets" {
  type      = map(string)
  default   = {}
  sensitive = true
}

variable "choice" {
  type    = string
  default = "a"

  validation {
    condition     = try(contains(["a", "b", "c"], var.choice), true)
    error_message = "The choice must be a, b or c."
  }
}

resource "terraform_data" "this" {
  input = {
    name     = var.name
    ratio    = var.ratio
    flag     = var.flag
    tags     = var.tags
    zones    = var.zones
    pair     = var.pair
    matrix   = var.matrix
    spec     = var.spec
    ports    = var.ports
    anything = jsonencode(var.anything)
    choice   = var.choice
  }
}

resource "terraform_data" "secret" {
  input = sha256(jsonencode([var.password, var.secrets]))
}

output "name" {
  description = "The name."
  value       = var.name
}

output "spec" {
  description = "The spec, defaults filled in."
  value       = var.spec
}

output "digest" {
  description = "A digest of the secrets."
  value       = terraform_data.secret.output
  sensitive   = true
}
