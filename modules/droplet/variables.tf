variable "name" {
  type        = string
  description = "Droplet hostname: letters, digits, dots and dashes."

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", var.name))
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
  description = "Tags to attach to the droplet."
}
