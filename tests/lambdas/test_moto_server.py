"""The stand-in for DynamoDB keeps every acknowledged write, however calls overlap.

moto rolls a cancelled transaction back by restoring a copy of the table taken when it began, which
used to erase writes other threads made meanwhile (the property test saw it as a lost mapping).
"""

from __future__ import annotations

import threading

import boto3
from botocore.exceptions import ClientError

from tests.lambdas.conftest import REGION

WRITES = 60
TRANSACTION = 50


def test_cancelled_transactions_never_erase_concurrent_writes(moto_url):
    client = boto3.client("dynamodb", region_name=REGION)
    client.create_table(
        TableName="overlap",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    # A long transaction (every one of its items fails) keeps the rollback's window wide open.
    taken = [f"taken-{n}" for n in range(TRANSACTION)]
    for key in taken:
        client.put_item(TableName="overlap", Item={"pk": {"S": key}})
    done = threading.Event()
    cancelled = 0

    def cancel_transactions() -> None:
        nonlocal cancelled
        other = boto3.client("dynamodb", region_name=REGION)
        while not done.is_set():
            try:
                other.transact_write_items(
                    TransactItems=[
                        {
                            "Put": {
                                "TableName": "overlap",
                                "Item": {"pk": {"S": key}},
                                "ConditionExpression": "attribute_not_exists(pk)",
                            }
                        }
                        for key in taken
                    ]
                )
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "TransactionCanceledException"
                cancelled += 1

    canceller = threading.Thread(target=cancel_transactions)
    canceller.start()
    try:
        for n in range(WRITES):
            client.put_item(TableName="overlap", Item={"pk": {"S": f"write-{n}"}})
    finally:
        done.set()
        canceller.join()

    items = client.scan(TableName="overlap", Select="COUNT")["Count"]
    assert cancelled > 0
    assert items == WRITES + TRANSACTION
