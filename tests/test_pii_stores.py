"""Synthetic PII sent to the real endpoint is stored nowhere: chat requests carrying Faker's
e-mail addresses, phone numbers, Visa numbers, SSNs and IBANs go to the endpoint serving the
loop's champion (tiny model); the request log is loaded, the monitoring assets and the rating
queue built from it, a rater's correction with PII submitted and copied to the feedback marts;
then every file, database and artifact of the data directory (and the Dagster storage in it)
is scanned with the same recognizers: nothing is found.

People's names are not in the list: Presidio recognises names only with a named-entity model,
which genops does not download, so neither the guardrails nor the scan can see them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest
from faker import Faker
from graph_support import (
    REPO,
    TASK,
    free_port,
    loop_job,
    make_defs,
    select,
    tiny_run_config,
)
from openai import OpenAI

from genops_assets.lib.guardrails.pii import find_pii
from genops_assets.lib.pii_scan import SKIPPED_KINDS, scan_home

pytestmark = pytest.mark.graph

ANSWER = {"category": "billing", "priority": "high", "product": "cloud_plan"}


def synthetic_pii(n: int) -> list[dict[str, str]]:
    """``n`` sets of Faker PII, each value one the pattern recognizers detect (Faker's phone
    formats with a 001- international prefix or an extension are not parsed and are left out)."""
    fake = Faker("en_US")
    iban = Faker("de_DE")
    Faker.seed(15)
    out = []
    while len(out) < n:
        phone = fake.phone_number()
        if "x" in phone or phone.startswith("001") or not find_pii(f"call {phone}"):
            continue
        out.append({"email": fake.email(), "phone": phone, "visa": fake.credit_card_number("visa"),
                    "ssn": fake.ssn(), "iban": iban.iban()})
    return out


def message(p: dict[str, str]) -> str:
    return (f"I was charged twice for the camera cloud plan on card {p['visa']}. Refund to IBAN {p['iban']}, "
            f"my SSN is {p['ssn']}; call {p['phone']} or write to {p['email']}.")


def test_synthetic_pii_is_not_stored_anywhere(home, tiny_model_dir, tmp_path):
    port = free_port()
    defs = make_defs(home, port)
    (home / "dagster").mkdir(parents=True)
    instance = dg.DagsterInstance.local_temp(tempdir=str(home / "dagster"))
    loop = loop_job(defs).execute_in_process(run_config=tiny_run_config(tiny_model_dir), instance=instance)
    assert loop.success

    people = synthetic_pii(6)
    texts = [message(p) for p in people]
    for text, p in zip(texts, people, strict=True):  # the scan could see every value if it were stored
        assert {f.entity for f in find_pii(text)} == {"CREDIT_CARD", "IBAN_CODE", "US_SSN", "PHONE_NUMBER",
                                                      "EMAIL_ADDRESS"}, p
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    for i, text in enumerate(texts):
        if i % 2:  # the endpoint renders the task prompt from the input
            reply = client.chat.completions.create(model=TASK, temperature=0, messages=[],
                                                   extra_body={"prompt_variables": {"message": text}})
        else:  # or the client sends the messages itself
            reply = client.chat.completions.create(model=TASK, temperature=0, max_tokens=32,
                                                   messages=[{"role": "user", "content": text}])
        assert reply.choices[0].message.content is not None

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    jobs = [dg.define_asset_job("pii_requests", selection=select("drift_calibration", "rating_queue")
                                | dg.AssetSelection.assets("request_log")),
            dg.define_asset_job("pii_monitoring", selection=select("serving_metrics", "prompt_drift")),
            dg.define_asset_job("pii_ratings", selection=select("human_ratings", "item_agreement",
                                                                "human_corrections", "preference_pairs"))]
    all_defs = dg.Definitions.merge(defs, dg.Definitions(jobs=jobs))
    assert all_defs.resolve_job_def("pii_requests").execute_in_process(instance=instance).success
    assert all_defs.resolve_job_def("pii_monitoring").execute_in_process(instance=instance,
                                                                         partition_key=today).success

    from genops_assets.lib.ratings import RatingStore
    from genops_assets.rating.service import RatingService

    store = RatingStore(home / "feedback" / "ratings.sqlite")
    service = RatingService(store, REPO / "tasks")
    store.add_rater("ana")
    live = [i for i in store.items(TASK) if i["source"] == "live"]
    assert live, "the rating queue holds the live requests"
    item = service.blind(live[0]["item_id"], "ana")
    p = people[0]
    correction = {**ANSWER, "summary": f"Refund double charge; customer at {p['email']}, {p['phone']}."}
    rating = {"choice": "1", "shown_first": item.shown_first} if item.kind == "pairwise" else {"score_1": 2}
    service.submit(TASK, "ana", item.item_id, correction=correction, **rating)
    assert all_defs.resolve_job_def("pii_ratings").execute_in_process(instance=instance).success

    report = scan_home(home)
    assert report.files > 20 and report.tables > 10, report.summary()
    assert report.clean, report.summary()
    assert all(s.endswith(tuple(f"({kind})" for kind in SKIPPED_KINDS)) for s in report.skipped), report.skipped
