# Renders settings as lines a POSIX shell can `source`: `export NAME='value'`, one a line,
# sorted by name. Every single quote in a value is written as '\'' (close, escaped quote,
# reopen), so no value can end the quoting or run a command, whatever it holds. Used by
# deploy/state and deploy/auth for their `env` outputs; never give it a secret.

terraform {
  required_version = ">= 1.10"
}

variable "vars" {
  type        = map(string)
  description = "Environment variables to render; null values are left out."

  validation {
    condition     = alltrue([for k in keys(var.vars) : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k))])
    error_message = "Names are letters, digits and underscores, not starting with a digit."
  }
}

output "text" {
  description = "The lines, ready for `terraform output -raw ... > file` and `. ./file`."
  value = join("", [
    for k in sort(keys(var.vars)) : "export ${k}='${replace(var.vars[k], "'", "'\\''")}'\n"
    if var.vars[k] != null
  ])
}
