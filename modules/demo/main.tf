# An offline demo: built only from the built-in terraform_data resource, so it needs no
# provider, no credentials and no network. It shows every feature of the API.

variable "name" {
  type        = string
  description = "Name of the demo resource: lowercase letters, digits and dashes."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,39}$", var.name))
    error_message = "The name must be 1-40 lowercase letters, digits or dashes."
  }
}

variable "greeting" {
  type        = string
  default     = "Hello"
  description = "Word used in the message output."
}

variable "replicas" {
  type        = number
  default     = 1
  description = "How many (pretend) replicas, 1 to 10."

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 10
    error_message = "The replicas must be between 1 and 10."
  }
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Free-form labels."
}

variable "settings" {
  type = object({
    tier    = string
    backups = optional(bool, false)
  })
  default     = { tier = "basic" }
  description = "Tier and backup switch."
}

variable "password" {
  type        = string
  default     = null
  sensitive   = true
  description = "A secret the demo stores (never shown back without the admin scope)."
}

resource "terraform_data" "demo" {
  input = {
    name     = var.name
    replicas = var.replicas
    tags     = var.tags
    tier     = var.settings.tier
    backups  = var.settings.backups
  }
}

resource "terraform_data" "secret" {
  count = var.password == null ? 0 : 1
  input = sha256(var.password)
}
