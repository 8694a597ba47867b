output "live_url" {
  description = "The app's URL (its custom domain once DNS and the certificate are in place)."
  value       = digitalocean_app.tfserver.live_url
}

output "default_ingress" {
  description = "The app's ondigitalocean.app URL, usable before the domain resolves."
  value       = digitalocean_app.tfserver.default_ingress
}

output "app_id" {
  description = "ID of the App Platform app."
  value       = digitalocean_app.tfserver.id
}
