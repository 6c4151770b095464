"""Running as a service: sd_notify, journald-friendly logs, safe-stop and doctor."""
