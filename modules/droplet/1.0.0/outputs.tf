output "droplet_id" {
  description = "ID of the droplet."
  value       = digitalocean_droplet.this.id
}

output "droplet_ip_address" {
  description = "Public IPv4 address of the droplet."
  value       = digitalocean_droplet.this.ipv4_address
}

output "droplet_ipv6_address" {
  description = "Public IPv6 address of the droplet (empty unless ipv6 is true)."
  value       = digitalocean_droplet.this.ipv6_address
}

output "droplet_status" {
  description = "Status of the droplet, such as active."
  value       = digitalocean_droplet.this.status
}

output "droplet_created_at" {
  description = "When the droplet was created (RFC 3339)."
  value       = digitalocean_droplet.this.created_at
}
