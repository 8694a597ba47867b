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
  default     = ["demo", "droplet"]
  description = "Modules tfserver serves: each gets a read and a write scope."

  validation {
    condition     = alltrue([for m in var.modules : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", m))])
    error_message = "Module names match ^[a-z0-9][a-z0-9_-]{0,62}$, as tfserver's URLs do."
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

variable "client_name" {
  type        = string
  default     = "tfserver-client"
  description = "Name of the client-credentials app client."
}

variable "client_scopes" {
  type        = list(string)
  default     = null
  description = "Scopes (without the prefix) the client may ask for; default: every module's read and write, not admin."

  validation {
    condition     = var.client_scopes == null || alltrue([for s in coalesce(var.client_scopes, []) : can(regex("^(admin|[a-z0-9][a-z0-9_-]{0,62}\\.(read|write))$", s))])
    error_message = "Scopes are admin, <module>.read or <module>.write."
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
