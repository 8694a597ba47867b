# Which modules tfserver serves, and the scopes that follow. No provider is involved, so
# tests evaluate this file on its own.

locals {
  # Every folder of ../../modules (the folder the image serves) with *.tf or *.tf.json files,
  # or with version folders (named by semantic version) that have them, is a served module,
  # as tfserver itself decides; var.modules overrides the discovery.
  modules_dir = "${path.module}/../../modules"
  discovered = sort(distinct(concat(
    [for f in fileset(local.modules_dir, "*/*.{tf,tf.json}") : dirname(f)],
    [for f in fileset(local.modules_dir, "*/*/*.{tf,tf.json}") : dirname(dirname(f))
    if can(regex("^(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$", basename(dirname(f))))],
  )))
  served_modules = var.modules != null ? sort(var.modules) : local.discovered

  # .approve answers the module's runs awaiting approval (the policy's require_approval).
  module_scopes = flatten([for m in local.served_modules : ["${m}.read", "${m}.write", "${m}.approve"]])
  admin_scopes  = ["${var.scope_prefix}/admin"]
  tenant_scopes = { for t, scopes in var.tenants : t => sort([for s in scopes : "${var.scope_prefix}/${s}"]) }
}
