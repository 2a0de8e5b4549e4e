"""EC2 route tables: read the VPC's tables, and create, re-point or delete one route.

Which route to touch is decided in ``core/routes.py``; this adapter only makes the calls and turns
EC2's answers into what the caller can act on. DescribeRouteTables has no resource-level
permissions (it needs ``*``); the route changes are allowed only on route tables of our VPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.routes import RouteTableView, refuse_default_route, table_from_describe


class RouteExists(RuntimeError):
    """CreateRoute found a route for that destination already (someone was quicker): read the
    table again and decide again."""


class Ec2Routes:
    def __init__(self, ec2_client: Any) -> None:
        self._ec2 = ec2_client

    def tables(
        self, vpc_id: str, table_ids: Iterable[str] | None = None
    ) -> dict[str, RouteTableView]:
        """The VPC's route tables (all of them: one call for a batch), or only ``table_ids``."""
        kwargs: dict[str, Any] = {"Filters": [{"Name": "vpc-id", "Values": [vpc_id]}]}
        if table_ids is not None:
            kwargs["RouteTableIds"] = sorted(set(table_ids))
            if not kwargs["RouteTableIds"]:
                return {}
        found: dict[str, RouteTableView] = {}
        try:
            for page in self._ec2.get_paginator("describe_route_tables").paginate(**kwargs):
                for raw in page.get("RouteTables", []):
                    table = table_from_describe(raw)
                    found[table.table_id] = table
        except ClientError as exc:
            # A table deleted under us fails the whole call: ask for each on its own.
            if exc.response["Error"]["Code"] != "InvalidRouteTableID.NotFound" or not table_ids:
                raise
            for table_id in set(table_ids):
                found.update(self._one(vpc_id, table_id))
        return found

    def _one(self, vpc_id: str, table_id: str) -> dict[str, RouteTableView]:
        try:
            reply = self._ec2.describe_route_tables(
                RouteTableIds=[table_id], Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "InvalidRouteTableID.NotFound":
                return {}
            raise
        return {t["RouteTableId"]: table_from_describe(t) for t in reply.get("RouteTables", [])}

    def create(self, table_id: str, destination: str, eni: str) -> None:
        refuse_default_route(destination)
        try:
            self._ec2.create_route(
                RouteTableId=table_id, DestinationCidrBlock=destination, NetworkInterfaceId=eni
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "RouteAlreadyExists":
                raise RouteExists(f"{table_id}: a route for {destination} exists") from exc
            raise

    def replace(self, table_id: str, destination: str, eni: str) -> None:
        refuse_default_route(destination)
        self._ec2.replace_route(
            RouteTableId=table_id, DestinationCidrBlock=destination, NetworkInterfaceId=eni
        )

    def delete(self, table_id: str, destination: str) -> None:
        refuse_default_route(destination)
        try:
            self._ec2.delete_route(RouteTableId=table_id, DestinationCidrBlock=destination)
        except ClientError as exc:
            # Gone already (deleted by hand, or the table with it): what we wanted.
            if exc.response["Error"]["Code"] not in (
                "InvalidRoute.NotFound",
                "InvalidRouteTableID.NotFound",
            ):
                raise
