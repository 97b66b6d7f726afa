"""Tickets of the HaloPSA client package (a submodule: shared.halopsa.tickets)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Ticket:
    id: int
    summary: str
    status: str


def open_tickets(tickets: list[Ticket]) -> list[Ticket]:
    return [t for t in tickets if t.status != "closed"]
