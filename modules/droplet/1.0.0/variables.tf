variable "name" {
  type        = string
  default     = null
  description = "Droplet hostname: letters, digits, dots and dashes. Defaults to the instance's name."

  validation {
    # can() turns the regex's error on null into false; null picks the instance's name.
    condition     = var.name == null || can(regex("^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", var.name))
    error_message = "The name must be a valid hostname: letters, digits, dots and dashes."
  }
}

variable "image" {
  type        = string
  description = "Image slug (such as ubuntu-24-04-x64) or numeric image ID."

  validation {
    condition     = can(regex("^([a-z0-9][a-z0-9.-]*|[0-9]+)$", var.image))
    error_message = "The image must be a slug such as ubuntu-24-04-x64, or an image ID."
  }
}

variable "region" {
  type        = string
  description = "Region slug, such as nyc3, sfo3, ams3 or fra1."

  validation {
    condition     = can(regex("^[a-z]{3}[0-9]$", var.region))
    error_message = "The region must be a slug of three letters and a digit, such as nyc3."
  }
}

variable "size" {
  type        = string
  description = "Size slug, such as s-1vcpu-1gb."

  validation {
    condition     = can(regex("^[a-z0-9]+(-[a-z0-9]+)*$", var.size))
    error_message = "The size must be a slug such as s-1vcpu-1gb."
  }
}

variable "monitoring" {
  type        = bool
  default     = false
  description = "Install the DigitalOcean monitoring agent."
}

variable "ipv6" {
  type        = bool
  default     = false
  description = "Give the droplet an IPv6 address."
}

variable "ssh_keys" {
  type        = list(string)
  default     = []
  description = "SSH key IDs or fingerprints to install for root."
}

variable "tags" {
  type        = list(string)
  default     = []
  nullable    = false
  description = "Tags to attach to the droplet, besides the tfserver-... tags the server sets."

  validation {
    # tfserver-... tags name the droplet's owner: a client must not be able to forge them.
    condition = alltrue([
      for tag in var.tags :
      can(regex("^[A-Za-z0-9:_-]{1,255}$", tag)) && !startswith(tag, "tfserver-")
    ])
    error_message = "Tags are 1 to 255 letters, digits, colons, dashes and underscores, and do not start with tfserver- (the server sets those)."
  }
}

# Filled by tfserver with the caller's tenant, the instance and this module's name (a client
# that sends them gets 400). The empty defaults keep the module usable without tfserver.
variable "tfserver_tenant" {
  type        = string
  default     = ""
  nullable    = false
  description = "Set by tfserver: the tenant (client id) the droplet belongs to."
}

variable "tfserver_instance" {
  type        = string
  default     = ""
  nullable    = false
  description = "Set by tfserver: the instance the droplet belongs to."
}

variable "tfserver_module" {
  type        = string
  default     = ""
  nullable    = false
  description = "Set by tfserver: the module's name as tfserver serves it."
}
