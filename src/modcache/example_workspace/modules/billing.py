"""Billing helpers (a plain module: modules.billing)."""

HOURLY_RATE = 120


def invoice_total(hours: float) -> float:
    return round(hours * HOURLY_RATE, 2)
