terraform {
  required_version = ">= 1.5"

  required_providers {
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.44"
    }
  }
}

# The provider reads its token from DIGITALOCEAN_TOKEN in the environment that tfserver
# hands to terraform; it is never a variable, so it never reaches a plan, a state or argv.
provider "digitalocean" {}
