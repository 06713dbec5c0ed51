"""The auditor model's trainer (``dpe serve auditor-trainer``): AuditDM's auditor, trained by the trainer's loop."""
