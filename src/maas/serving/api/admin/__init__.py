"""The admin API (``/admin/v1/...``): register, name, deploy and delete models, and (admin keys) manage keys and
read the audit log, over HTTP, under the same rules as the local ``maas`` commands."""
