"""What happens to transcripts on their way out, before any sink sees them (PCI redaction first)."""
