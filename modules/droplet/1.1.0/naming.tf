# The droplet's name and tags, from the variables only (no resources, no provider), so they
# can be checked without the DigitalOcean provider.
locals {
  # An instance name may hold underscores and end in a dash or underscore; a hostname may not.
  instance_hostname = replace(replace(var.tfserver_instance, "_", "-"), "/-+$/", "")
  name              = try(coalesce(var.name, local.instance_hostname), "")

  # DigitalOcean tags are letters, digits, colons, dashes and underscores, at most 255:
  # anything else in a tenant id becomes an underscore, and a long one is cut.
  server_tags = [
    for kind, value in {
      tenant   = var.tfserver_tenant
      instance = var.tfserver_instance
      module   = var.tfserver_module
    } : substr("tfserver-${kind}-${replace(value, "/[^A-Za-z0-9:_-]/", "_")}", 0, 255)
    if value != ""
  ]
  tags = concat(var.tags, local.server_tags)
}
