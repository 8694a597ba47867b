resource "digitalocean_droplet" "this" {
  name       = local.name
  image      = var.image
  region     = var.region
  size       = var.size
  monitoring = var.monitoring
  ipv6       = var.ipv6
  ssh_keys   = var.ssh_keys
  tags       = local.tags

  lifecycle {
    precondition {
      condition     = local.name != ""
      error_message = "Set name: without tfserver, which names the droplet after its instance, there is no default."
    }
  }
}
