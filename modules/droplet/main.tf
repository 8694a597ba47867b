resource "digitalocean_droplet" "this" {
  name       = var.name
  image      = var.image
  region     = var.region
  size       = var.size
  monitoring = var.monitoring
  ipv6       = var.ipv6
  ssh_keys   = var.ssh_keys
  tags       = var.tags
}
