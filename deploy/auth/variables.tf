variable "region" {
  type        = string
  description = "AWS region of the user pool, such as eu-west-1."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "The region must be an AWS region name such as eu-west-1."
  }
}

variable "pool_name" {
  type        = string
  default     = "tfserver"
  description = "Name of the Cognito user pool."
}

variable "domain_prefix" {
  type        = string
  description = "Cognito domain prefix: the token endpoint is https://<prefix>.auth.<region>.amazoncognito.com."

  validation {
    condition     = can(regex("^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", var.domain_prefix)) && !strcontains(var.domain_prefix, "cognito")
    error_message = "The prefix must be lowercase letters, digits and dashes, without the word cognito."
  }
}

variable "modules" {
  type        = list(string)
  default     = null
  description = "Modules tfserver serves, each with a read, a write and an approve scope; default: every folder of ../../modules with Terraform files."
}

variable "tenants" {
  type        = map(list(string))
  default     = {}
  description = "Tenants by name, each with the scopes (without the prefix) its client may ask for, such as [\"droplet.read\", \"droplet.write\"] (or \"droplet.approve\")."

  validation {
    condition     = alltrue([for t in keys(var.tenants) : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", t)) && t != "admin"])
    error_message = "Tenant names match ^[a-z0-9][a-z0-9_-]{0,62}$ and are not admin."
  }

  validation {
    condition     = alltrue(flatten([for scopes in values(var.tenants) : [for s in scopes : can(regex("^[a-z0-9][a-z0-9_-]{0,62}\\.(read|write|approve)$", s))]]))
    error_message = "Tenant scopes are <module>.read, <module>.write or <module>.approve; admin belongs to the admin client only."
  }

  validation {
    condition     = alltrue([for scopes in values(var.tenants) : length(setsubtract(scopes, local.module_scopes)) == 0])
    error_message = "A tenant asks for a scope of a module that is not served (served: ${join(", ", local.served_modules)})."
  }
}

variable "scope_prefix" {
  type        = string
  default     = "tfserver"
  description = "Resource server identifier and scope prefix (TFSERVER_SCOPE_PREFIX)."

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:-]{1,256}$", var.scope_prefix))
    error_message = "The prefix must be letters, digits, dots, colons, dashes or underscores."
  }
}

variable "access_token_minutes" {
  type        = number
  default     = 60
  description = "Lifetime of access tokens, 5 to 1440 minutes."

  validation {
    condition     = var.access_token_minutes >= 5 && var.access_token_minutes <= 1440
    error_message = "The lifetime must be between 5 and 1440 minutes."
  }
}
