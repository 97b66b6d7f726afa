"""A small HaloPSA client package, as an MSP workspace might share it between workflows."""

from shared.halopsa.tickets import Ticket, open_tickets

BASE_URL = "https://halo.example.com/api"

__all__ = ["BASE_URL", "Ticket", "open_tickets"]
