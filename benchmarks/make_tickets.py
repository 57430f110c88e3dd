"""Deterministic generator of realistic, varied customer-support tickets.

Used to build the small fixtures in ``sample_data/`` and the larger (20,000+ row)
inputs for the benchmarks. Only the standard library (``random``) drives the
content, so a given ``(n, seed)`` always yields identical rows; pyarrow is needed
only for the optional Parquet output.

Each ticket is a dict with exactly these string keys, in this order:
``id, customer, channel, product, priority, created_at, subject, ticket``.
Bodies are 2-8 sentences (roughly 30-250 words) assembled from many slotted
templates: the problem, quoted error messages, account details (order numbers,
workspace IDs, request IDs), steps already tried, business impact, a follow-up
question and a polite or frustrated closing. About 6% of tickets are written in
French, Spanish, German or Portuguese, and some names, cities and emoji are
non-ASCII.

Library use (run from ``benchmarks/`` or with it on ``sys.path``)::

    from make_tickets import make_tickets
    for row in make_tickets(20_000, seed=7):
        ...

CLI (streams rows; never holds them all in memory)::

    python benchmarks/make_tickets.py N OUT.jsonl [--parquet OUT.parquet] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

COLUMNS: tuple[str, ...] = (
    "id",
    "customer",
    "channel",
    "product",
    "priority",
    "created_at",
    "subject",
    "ticket",
)
PARQUET_BATCH_ROWS = 10_000
MAX_SENTENCES = 8
MIN_WORDS = 30
MAX_WORDS = 250

CHANNELS: tuple[str, ...] = ("email", "chat", "phone", "web")
CHANNEL_WEIGHTS: tuple[int, ...] = (40, 25, 10, 25)
PRODUCTS: tuple[str, ...] = (
    "billing",
    "login",
    "mobile app",
    "API",
    "reports",
    "integrations",
    "notifications",
    "data export",
)
PRODUCT_WEIGHTS: tuple[int, ...] = (16, 16, 12, 14, 12, 12, 8, 10)
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "urgent")
PRIORITY_WEIGHTS: tuple[int, ...] = (20, 48, 23, 9)
FOREIGN_SHARE = 0.06
EMOJI_SHARE = 0.04

MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_SECONDS = 31 * 24 * 3600

# fmt: off
# ------------------------------------------------------------------------------- names

FIRST_NAMES: tuple[str, ...] = (
    "Emma", "Liam", "Olivia", "Noah", "Priya", "Arjun", "Mei", "Wei", "Fatima", "Omar",
    "Hannah", "Lucas", "Sofia", "Mateo", "Chloe", "Daniel", "Aisha", "Kwame", "Yuki",
    "Hiroshi", "Grace", "Ethan", "Isabella", "James", "Nina", "Tom", "Rachel", "Marcus",
    "Elena", "Pavel", "Ingrid", "Lars", "Amara", "Diego", "Laura", "Kevin", "Sarah", "Ben",
)
FIRST_NAMES_INTL: tuple[str, ...] = (
    "Zoë", "José", "François", "Søren", "Björn", "Chloé", "Inês", "Łukasz", "Renée",
    "Jürgen", "Ágnes", "Joël", "Mónica", "Océane", "Dagný", "Çağla",
)
LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Patel", "Nguyen", "Kim", "Garcia", "Martinez", "Brown", "Okafor",
    "Chen", "Schmidt", "Rossi", "Novak", "Kowalski", "Andersson", "Haddad", "Tanaka",
    "O'Brien", "Walsh", "Dubois", "Silva", "Cohen", "Murphy", "Ivanova", "Mensah", "Reyes",
    "Fischer", "Larsen", "Sato", "Hughes", "Bennett", "Khan", "Fernandes", "Clarke",
)
LAST_NAMES_INTL: tuple[str, ...] = (
    "Müller", "Álvarez", "Gonçalves", "Søndergaard", "Lefèvre", "Peña", "Åberg",
    "Wójcik", "Núñez", "Jäger", "Ibáñez", "Öztürk", "Björnsdóttir", "Brontë",
)
COMPANY_HEADS: tuple[str, ...] = (
    "Northwind", "Bluefin", "Acme", "Larkspur", "Copperleaf", "Granite", "Harbor",
    "Silverline", "Brightpath", "Tallgrass", "Redwood", "Keystone", "Summit", "Lumen",
    "Fernhill", "Ironbridge", "Maple & Oak", "Quayside", "Pinecrest", "Orbital",
    "Kestrel", "Riverbend", "Cobalt", "Juniper", "Meridian", "Sable", "Westfield",
)
COMPANY_TAILS: tuple[str, ...] = (
    "Logistics", "Analytics", "Health", "Foods", "Labs", "Studios", "Dental", "Consulting",
    "Realty", "Outfitters", "Freight", "Software", "Legal", "Bakery", "Marketing", "Clinics",
    "Robotics", "Travel", "Energy", "Architects", "Print Shop", "Veterinary", "Fitness",
)
COMPANY_SUFFIXES: tuple[str, ...] = ("", "", "", "", " Inc.", " Ltd", " LLC", " Co.", " Ltd.")
COMPANIES_INTL: tuple[str, ...] = (
    "Bäckerei Sonnenschein GmbH", "Café Lumière", "Zürcher Treuhand AG", "Ñandú Viajes S.L.",
    "Kraków Dental Sp. z o.o.", "Fjällblick Outdoor AB", "São Paulo Logística Ltda.",
    "Crème & Co", "Müller & Söhne KG", "Boulangerie Hélène", "Añejo Cervecería",
    "Ålesund Fisk AS",
)
CONTACT_ROLES: tuple[str, ...] = (
    "Office Manager", "IT Admin", "Finance", "Head of Operations", "CTO", "Accounts Payable",
    "Customer Success Lead", "Founder", "Data Team", "Marketing Ops", "Engineering Manager",
)
CITIES: tuple[str, ...] = (
    "Chicago", "London", "Toronto", "Austin", "Sydney", "Dublin", "Singapore", "Berlin",
    "Denver", "Manchester", "Nairobi", "Lagos", "Boston", "Seattle", "Lisbon", "Amsterdam",
)
CITIES_INTL: tuple[str, ...] = (
    "München", "São Paulo", "Zürich", "Kraków", "Malmö", "Montréal", "Bogotá", "Reykjavík",
    "Düsseldorf", "Córdoba",
)

# ------------------------------------------------------------------------------- slot values

PLANS: tuple[str, ...] = ("Starter", "Team", "Business", "Pro", "Enterprise", "Growth")
BROWSERS: tuple[str, ...] = (
    "Chrome 129", "Chrome 130", "Firefox 131", "Safari 18", "Edge 129", "Safari on macOS 15",
)
DEVICES: tuple[str, ...] = (
    "iPhone 15 (iOS 18.0.1)", "iPhone 13 mini (iOS 17.6)", "Pixel 8 (Android 15)",
    "Samsung Galaxy S23 (Android 14)", "iPad Air (iPadOS 18)", "OnePlus 11 (Android 14)",
    "Motorola G54 (Android 13)",
)
INTEGRATIONS: tuple[str, ...] = (
    "Slack", "Salesforce", "HubSpot", "Zapier", "Jira", "Shopify", "QuickBooks", "Xero",
    "Microsoft Teams", "Google Sheets", "Zendesk", "Stripe",
)
REPORT_NAMES: tuple[str, ...] = (
    "Monthly Revenue", "Churn by Cohort", "Weekly Active Users", "Pipeline Summary",
    "Agent Performance", "Invoice Aging", "Q3 Board Pack", "Inventory Turnover",
)
ENDPOINTS: tuple[str, ...] = (
    "/v2/orders", "/v2/customers/{id}", "/v2/invoices", "/v1/webhooks", "/v2/events/search",
    "/v2/users/bulk", "/oauth/token", "/v2/reports/run",
)
EXPORT_FORMATS: tuple[str, ...] = ("CSV", "XLSX", "JSON", "Parquet")
NOTIF_KINDS: tuple[str, ...] = (
    "push notifications", "email digests", "SMS alerts", "Slack alerts", "in-app notifications",
)
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
# "{since}" follows a present-perfect verb ("has been failing {since}").
SINCE: tuple[str, ...] = (
    "since yesterday", "since this morning", "for about two hours", "since the last update",
    "for three days now", "since Monday", "on and off all week", "since the weekend",
    "since about 9am our time", "since we upgraded our plan",
)
# "{when}" follows a past-tense verb ("It started {when}").
WHEN: tuple[str, ...] = (
    "yesterday", "this morning", "on Monday", "right after the last update", "last night",
    "after we upgraded our plan", "a couple of days ago", "around lunchtime today",
)
HOURS: tuple[str, ...] = ("9:15am", "10:40am", "noon", "2pm", "3:30pm", "4:45pm", "11pm")
# fmt: on


def _pick(rng: random.Random, items: tuple[str, ...]) -> str:
    """Return one element of ``items`` (uniform)."""
    return items[int(rng.random() * len(items))]


def _ascii_slug(text: str) -> str:
    """Lowercase ASCII-only slug of ``text`` for fake e-mail addresses and domains."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _hexid(rng: random.Random, n: int) -> str:
    """Random lowercase hex string of ``n`` characters."""
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _amount(rng: random.Random) -> str:
    """A plausible invoice amount such as ``$1,249.37``."""
    base = rng.choice((49, 99, 149, 199, 249, 480, 1_200, 2_340))
    return f"${base + rng.randint(0, 99) / 100:,.2f}"


_SLOT_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "order": lambda r: f"ORD-{r.randint(10_000, 99_999)}",
    "invoice": lambda r: f"INV-2026-{r.randint(7, 10):02d}-{r.randint(1, 9_999):04d}",
    "case": lambda r: f"#{r.randint(40_000, 89_999)}",
    "amount": _amount,
    "amount2": _amount,
    "plan": lambda r: _pick(r, PLANS),
    "seats": lambda r: str(r.choice((3, 5, 8, 12, 25, 40, 60, 150, 400))),
    "browser": lambda r: _pick(r, BROWSERS),
    "device": lambda r: _pick(r, DEVICES),
    "app_version": lambda r: f"4.{r.randint(8, 14)}.{r.randint(0, 5)}",
    "integration": lambda r: _pick(r, INTEGRATIONS),
    "report": lambda r: _pick(r, REPORT_NAMES),
    "endpoint": lambda r: _pick(r, ENDPOINTS),
    "request_id": lambda r: f"req_{_hexid(r, 16)}",
    "workspace": lambda r: f"ws-{_hexid(r, 6)}",
    "key_tail": lambda r: _hexid(r, 4),
    "fmt": lambda r: _pick(r, EXPORT_FORMATS),
    "notif": lambda r: _pick(r, NOTIF_KINDS),
    "since": lambda r: _pick(r, SINCE),
    "when": lambda r: _pick(r, WHEN),
    "weekday": lambda r: _pick(r, WEEKDAYS),
    "hour": lambda r: _pick(r, HOURS),
    "count": lambda r: str(r.choice((3, 4, 6, 12, 20, 37, 150, 1_200))),
    "rpm": lambda r: str(r.choice((20, 40, 60, 100, 250))),
    "pct": lambda r: str(r.choice((5, 10, 20, 30, 50, 80))),
    "rows": lambda r: f"{r.choice((12, 48, 250, 900, 2_400)) * 1_000:,}",
    "minutes": lambda r: str(r.choice((5, 10, 15, 30, 45))),
    "workers": lambda r: str(r.choice((2, 4, 8))),
    "last4": lambda r: f"{r.randint(0, 9_999):04d}",
    "offices": lambda r: _pick(r, ("two", "three", "four", "five")),
    "city": lambda r: _pick(r, CITIES_INTL) if r.random() < 0.2 else _pick(r, CITIES),
}


class _Slots(dict[str, str]):
    """Lazily-filled template slots: a value is drawn on first use, then reused."""

    def __init__(self, rng: random.Random, base: dict[str, str]) -> None:
        super().__init__(base)
        self._rng = rng

    def __missing__(self, key: str) -> str:
        maker = _SLOT_MAKERS.get(key)
        if maker is None:
            raise KeyError(key)
        value = maker(self._rng)
        self[key] = value
        return value


# ------------------------------------------------------------------------------- English content


class _Issue(NamedTuple):
    """One kind of problem: matching subject lines, problem statements and error texts.

    Error texts are ``str.format`` templates too, so literal braces are doubled.
    """

    subjects: tuple[str, ...]
    problems: tuple[str, ...]
    errors: tuple[str, ...]


# fmt: off
ISSUES: dict[str, tuple[_Issue, ...]] = {
    "billing": (
        _Issue(
            ("Charged twice this month", "Duplicate charge on our card", "Double billing?"),
            (
                "We were charged {amount} twice on our card ending in {last4} this month, but I can only find one invoice on the billing page.",
                "Our bank statement shows two identical charges of {amount} from you on the same day.",
            ),
            ("Transaction pending: duplicate authorization", "Charge pending (reference {order})"),
        ),
        _Issue(
            ("Invoice {invoice} has the wrong amount", "Wrong total on latest invoice"),
            (
                "Invoice {invoice} shows {amount}, but our {plan} plan should be {amount2} per month according to the pricing page.",
                "The latest invoice ({invoice}) includes {seats} seats, although we only have about half that many active users.",
            ),
            ("Invoice total does not match subscription", "Tax calculation unavailable for this address"),
        ),
        _Issue(
            ("Card declined but we were still downgraded", "Workspace downgraded after payment failure"),
            (
                "Our card was declined {when} and the workspace was downgraded to the free tier, even though the bank says no charge attempt was made.",
                "We got an email saying payment failed, and now half of our features are locked, although the card works everywhere else.",
            ),
            ("Your card was declined (code: do_not_honor).", "Payment failed: authentication_required", "Error 402: subscription past due"),
        ),
        _Issue(
            ("Refund request for {order}", "Charged after cancelling"),
            (
                "I cancelled the annual renewal before the deadline, but we were still charged {amount} for order {order}.",
                "We downgraded {when}, yet the full {plan} price of {amount} was taken for order {order}.",
            ),
            ("Subscription status: active (renewed)", "Cancellation could not be processed. Please contact support."),
        ),
        _Issue(
            ("Need VAT number on invoices", "VAT ID field won't save"),
            (
                "We need our VAT number printed on every invoice for our accountant, but the field in billing settings won't save.",
                "Our VAT ID keeps getting rejected in the billing settings, so the invoices go out without it.",
            ),
            ("Invalid VAT ID format", "Unable to update billing details. Please try again later."),
        ),
        _Issue(
            ("Billing email goes to a former employee", "Can't change billing contact"),
            (
                "Invoices are still being sent to a colleague who left the company, and I can't find where to change the billing contact.",
                "When I try to change the billing contact to {email}, the page says I don't have access, although I'm an admin.",
            ),
            ("Only the account owner can change billing settings.", "Unable to update billing details. Please try again later."),
        ),
    ),
    "login": (
        _Issue(
            ("Can't log in after password reset", "New password not accepted"),
            (
                "I reset my password {when}, but the new password is rejected every time I try to sign in.",
                "After the password reset the login page keeps telling me my credentials are wrong, even when I copy and paste the password.",
            ),
            ("Invalid email or password.", "Your password has expired. Please reset it."),
        ),
        _Issue(
            ("2FA codes not accepted", "Locked out by two-factor authentication"),
            (
                "The two-factor codes from my authenticator app are never accepted, even though the clock on my phone is correct.",
                "I got a new phone and can't get past the 2FA step anymore because the codes don't match.",
            ),
            ("The verification code you entered is incorrect.", "Too many attempts. Please try again in 15 minutes."),
        ),
        _Issue(
            ("SSO login loop", "SAML login broken for our whole team"),
            (
                "When I sign in with our company SSO it bounces me back to the login page in an endless loop.",
                "Nobody in our organisation has been able to sign in through SSO {since}, and we haven't touched our identity provider settings.",
            ),
            ("SAML response signature could not be verified.", "Error AADSTS50011: reply URL does not match"),
        ),
        _Issue(
            ("Magic link expired immediately", "Login link doesn't work"),
            (
                "The magic link in the login email says it has expired the moment I click it, even if I open it within a minute.",
                "Every sign-in link you email me is already invalid when I open it on my laptop.",
            ),
            ("This link is invalid or has expired.", "Token already used"),
        ),
        _Issue(
            ("Invite email never arrived", "New team member can't join"),
            (
                "A new team member was invited {when} but never received the invitation email, and resending does nothing.",
                "We invited {count} new colleagues and none of them got the invitation email, not even in spam.",
            ),
            ("Invitation already pending for this address", "Seat limit reached for your plan"),
        ),
        _Issue(
            ("Login very slow / times out", "Login page hangs"),
            (
                "Login takes over a minute and then times out, but only in {browser}; it seems fine in other browsers.",
                "The login page has been hanging on the spinner {since} for several people in our office in {city}.",
            ),
            ("504 Gateway Timeout", "Request timed out. Check your connection and try again."),
        ),
    ),
    "mobile app": (
        _Issue(
            ("App crashes on launch", "Crash after updating to {app_version}"),
            (
                "The mobile app crashes immediately on launch on my {device} after updating to version {app_version}.",
                "Since the update to {app_version} the app closes itself as soon as I open the dashboard.",
            ),
            ("Something went wrong. Please restart the app. (code E-1042)", "App not responding"),
        ),
        _Issue(
            ("Mobile app stuck on loading screen", "App won't load"),
            (
                "The app has been stuck on the loading screen {since}, both on Wi-Fi and on mobile data.",
                "The app opens but never gets past the loading spinner on my {device}.",
            ),
            ("Sync failed: network connection lost", "Unable to reach server"),
        ),
        _Issue(
            ("Offline mode lost my changes", "Changes made offline disappeared"),
            (
                "I made a bunch of changes while offline on the train, and when I reconnected they were all gone.",
                "Notes I entered offline at a customer site {when} never synced and are now missing.",
            ),
            ("Conflict detected: server version kept", "Sync failed: network connection lost"),
        ),
        _Issue(
            ("Can't upload photos from the app", "Attachments fail in mobile app"),
            (
                "Uploading photos from the app fails with a spinning wheel and then nothing happens.",
                "Any attachment larger than a couple of megabytes fails to upload from my {device}.",
            ),
            ("Upload failed: file too large", "Upload failed (code E-2210)"),
        ),
        _Issue(
            ("App logs me out every day", "Keep getting signed out of the app"),
            (
                "The app logs me out every single day and I have to go through 2FA again each time.",
                "I get signed out of the app several times a day, usually right when I'm in the middle of something.",
            ),
            ("Session expired. Please sign in again.",),
        ),
        _Issue(
            ("Dark mode text unreadable on {device}", "Display issues in dark mode"),
            (
                "In dark mode on my {device} some of the labels are black on dark grey and basically unreadable.",
                "Since {app_version}, dark mode makes half of the buttons invisible on my {device}.",
            ),
            ("Rendering error: missing theme resource 'label.secondary'",),
        ),
    ),
    "API": (
        _Issue(
            ("Getting 429s well under our rate limit", "Rate limiting seems wrong"),
            (
                "We're getting HTTP 429 responses from {endpoint} even though we send fewer than {rpm} requests per minute, well below our documented limit.",
                "Our integration has been hitting rate limits {since}, although our traffic hasn't changed.",
            ),
            ('{{"error": "rate_limit_exceeded", "retry_after": 60}}', "429 Too Many Requests"),
        ),
        _Issue(
            ("500 errors from {endpoint}", "Intermittent server errors on {endpoint}"),
            (
                "Calls to {endpoint} have been returning 500 errors {since}, roughly {pct}% of requests.",
                "About one in five requests to {endpoint} fails with a server error, and retrying sometimes works.",
            ),
            ("HTTP 500 Internal Server Error (request id {request_id})", "502 Bad Gateway"),
        ),
        _Issue(
            ("Webhook deliveries delayed", "Missing webhook events"),
            (
                "Webhook deliveries to our endpoint are arriving {minutes} to 60 minutes late, which breaks our order processing.",
                "Some webhook events never reach us at all; we compared against the event log and {count} are missing.",
            ),
            ("Delivery attempt failed: timeout after 10s", "webhook.delivery.retrying"),
        ),
        _Issue(
            ("OAuth token refresh failing", "invalid_grant on token refresh"),
            (
                "Refreshing OAuth tokens has been failing {since}; nothing changed on our side as far as we can tell.",
                "Our nightly job can no longer refresh its access token, so every run after midnight fails.",
            ),
            ('{{"error": "invalid_grant", "error_description": "refresh token expired"}}',),
        ),
        _Issue(
            ("API key suddenly invalid", "Production API key stopped working"),
            (
                "Our production API key (ending in {key_tail}) suddenly returns 401 Unauthorized, and nobody on our team rotated it.",
                "All calls with our live key started failing {when}, while the test key still works fine.",
            ),
            ("401 Unauthorized: invalid API key", '{{"error": "unauthorized", "message": "API key revoked"}}'),
        ),
        _Issue(
            ("Pagination returns duplicate records", "Cursor pagination skips items"),
            (
                "When paginating through {endpoint} with the cursor, some records appear twice and others are missing.",
                "Our full sync over {endpoint} returns about {count} fewer records than the dashboard shows.",
            ),
            ('{{"error": "invalid_cursor"}}', "400 Bad Request: cursor expired"),
        ),
        _Issue(
            ("Timeouts on {endpoint} since {weekday}", "API very slow"),
            (
                "Requests to {endpoint} have been timing out after 30 seconds since {weekday}, whereas they used to take under a second.",
                "Latency on {endpoint} has gone from around 200 ms to several seconds {since}.",
            ),
            ("504 Gateway Timeout", "ReadTimeout: read timed out (30s)"),
        ),
    ),
    "reports": (
        _Issue(
            ("{report} report shows wrong totals", "Report totals look inflated"),
            (
                "The {report} report shows totals that are about {pct}% higher than what we see in the raw data.",
                "The totals in {report} changed overnight for months that are already closed.",
            ),
            ("Some data is still processing and may be incomplete",),
        ),
        _Issue(
            ("Numbers in dashboard don't match export", "Dashboard vs export mismatch"),
            (
                "The numbers in the dashboard don't match what we get when we export the same report.",
                "The {report} dashboard and its {fmt} export disagree by roughly {pct}%.",
            ),
            ("Some data is still processing and may be incomplete", "Totals are estimated for large date ranges"),
        ),
        _Issue(
            ("Scheduled report not delivered", "Weekly report email missing"),
            (
                "Our scheduled {report} report didn't go out on {weekday} morning, and nobody on the distribution list got it.",
                "The {report} report is supposed to arrive every Monday at 8am, but it hasn't come {since}.",
            ),
            ("Report could not be generated (code RPT-17)",),
        ),
        _Issue(
            ("Report takes forever to load", "Dashboard crashes"),
            (
                "Opening the {report} dashboard takes several minutes and sometimes the page just crashes.",
                "Any report covering more than a month times out for us, which makes quarterly reviews impossible.",
            ),
            ("Query timed out. Try narrowing the date range.",),
        ),
        _Issue(
            ("Timezone wrong in reports", "Report timestamps off by hours"),
            (
                "All the timestamps in reports are shown in UTC, even though the workspace timezone is set to our local time in {city}.",
                "Daily totals in the {report} report are shifted by a few hours, so sales from the evening land on the next day.",
            ),
            ("Timezone: UTC (workspace default)",),
        ),
        _Issue(
            ("Can't share report with client", "Share button greyed out"),
            (
                "I can't share the {report} report with an external client; the share button is greyed out.",
                "When I send a share link for {report}, the client only sees an empty page.",
            ),
            ("You do not have permission to share this report.",),
        ),
    ),
    "integrations": (
        _Issue(
            ("{integration} sync stopped", "{integration} integration disconnected again"),
            (
                "Our {integration} integration stopped syncing {when}, and the last successful sync was on {weekday}.",
                "The {integration} connection keeps getting disconnected and we have to re-authorize it almost daily.",
            ),
            ("Token revoked by provider", "Sync paused: too many errors"),
        ),
        _Issue(
            ("Duplicate records after {integration} sync", "{integration} creating duplicates"),
            (
                "After the last {integration} sync we ended up with {count} duplicate contacts.",
                "Every {integration} sync creates a new copy of records that already exist on our side.",
            ),
            ("Field 'external_id' is not unique",),
        ),
        _Issue(
            ("Field mapping missing for {integration}", "Custom fields not syncing to {integration}"),
            (
                "There is no way to map our custom fields in the {integration} integration settings, so data lands in the wrong place.",
                "Our custom fields stopped syncing to {integration} and are empty on the other side.",
            ),
            ("Mapping failed for field 'Region__c'", "Unknown field: custom_field_7"),
        ),
        _Issue(
            ("Can't authorize {integration}", "{integration} connection fails"),
            (
                "When I try to authorize {integration} the popup closes and nothing gets connected.",
                "Connecting {integration} fails at the very last step with a permissions error, even with an admin account.",
            ),
            ("Authorization failed: redirect_uri_mismatch", "{integration} returned 403 Forbidden"),
        ),
        _Issue(
            ("{integration} sync very slow", "{integration} sync takes hours"),
            (
                "Syncing with {integration} has become extremely slow; a sync of about {rows} records now takes hours.",
                "The {integration} sync used to finish in minutes but now runs all night.",
            ),
            ("Sync in progress (estimated time remaining: 6h)", "{integration} API rate limit reached, retrying"),
        ),
    ),
    "notifications": (
        _Issue(
            ("Not receiving {notif}", "{notif} stopped"),
            (
                "I haven't received any {notif} {since}, although they are enabled in my settings.",
                "None of our team gets {notif} anymore, and nothing changed in our settings.",
            ),
            ("Delivery failed: recipient address rejected", "550 5.1.1 User unknown"),
        ),
        _Issue(
            ("Notifications arrive hours late", "Delayed alerts"),
            (
                "Our {notif} arrive hours after the event, which makes them useless for our on-call team.",
                "Alerts that should fire within a minute are showing up {minutes} minutes to an hour late.",
            ),
            ("Queued for delivery", "Delivery delayed: provider throttling"),
        ),
        _Issue(
            ("Way too many notifications", "Notification spam"),
            (
                "We're getting flooded with notifications, sometimes {count} for a single event.",
                "Every small change triggers a separate email to the whole team, which is driving people mad.",
            ),
            ("Notification rule 'All activity' is enabled for all members",),
        ),
        _Issue(
            ("Getting alerts for another workspace", "Notifications from a workspace I left"),
            (
                "I keep getting alerts for a workspace I was removed from months ago.",
                "I'm receiving notifications about projects from a different workspace ({workspace}) that I never joined.",
            ),
            ("You are receiving this because you are a member of {workspace}",),
        ),
        _Issue(
            ("Unsubscribe link doesn't work", "Can't unsubscribe from digests"),
            (
                "The unsubscribe link in the email digest leads to an error page.",
                "I've clicked unsubscribe on the weekly digest several times and it keeps coming.",
            ),
            ("404 Page not found", "Could not update preferences."),
        ),
        _Issue(
            ("Notification settings keep resetting", "Preferences not saved"),
            (
                "My notification settings reset to the defaults every time the app updates.",
                "I turn off {notif} and a day later they're back on.",
            ),
            ("Could not update preferences.",),
        ),
    ),
    "data export": (
        _Issue(
            ("{fmt} export fails", "Export keeps failing"),
            (
                "Every time I try to export our data as {fmt} it fails after a few minutes.",
                "Exports of more than a few weeks of data fail every time, in any format.",
            ),
            ("Export failed: file exceeds 2 GB limit", "Export job {request_id} failed with status ERROR"),
        ),
        _Issue(
            ("Export stuck at 99%", "Export never finishes"),
            (
                "The export has been stuck at 99% {since} and the download never becomes available.",
                "I started an export {when} and it still says it's processing.",
            ),
            ("Export job {request_id} is still running", "Preparing your file..."),
        ),
        _Issue(
            ("Export missing columns", "Columns missing from {fmt} export"),
            (
                "The {fmt} export is missing several columns that are visible in the table view.",
                "Custom fields don't appear in the {fmt} export at all, only the standard columns.",
            ),
            ("Column limit reached (255)",),
        ),
        _Issue(
            ("Special characters broken in {fmt} export", "Encoding problem in export"),
            (
                "Names with accents show up as garbage characters in the {fmt} export, for example our customer in {city}.",
                "Anything that isn't plain English turns into question marks when I open the {fmt} export.",
            ),
            ('UnicodeEncodeError in column "customer_name"',),
        ),
        _Issue(
            ("Need full account data export (GDPR)", "Data subject access request"),
            (
                "Under GDPR we need a complete export of all personal data stored for our workspace {workspace}.",
                "We received a data subject access request and need everything you hold about one of our users.",
            ),
            ("Full account export is only available to the account owner.",),
        ),
        _Issue(
            ("Export download link expired", "Can't download finished export"),
            (
                "The download link from the export email says it has expired, although I clicked it the same day.",
                "The export finished, but the download link returns an error page.",
            ),
            ("This download link has expired.", "AccessDenied: Request has expired"),
        ),
    ),
}

ERROR_FRAMES: tuple[str, ...] = (
    'The exact error message is: "{err}"',
    'It says "{err}" every time.',
    'I keep getting this message: "{err}"',
    'The screen just shows "{err}" and nothing else.',
    "Error: {err}",
    'Sometimes it shows "{err}", sometimes it just fails silently.',
)
ERROR_FRAMES_TECH: tuple[str, ...] = (
    "Our logs show: {err}",
    "Response from your side: {err}",
)

DETAILS: dict[str, tuple[str, ...]] = {
    "billing": (
        "The order number on the confirmation email is {order}.",
        "We're on the {plan} plan with {seats} seats, billed annually.",
        "Our workspace ID is {workspace}, in case that helps.",
        "The invoice in question is {invoice}.",
    ),
    "login": (
        "I'm using {browser} on a work laptop.",
        "The account email is {email}.",
        "Our workspace ID is {workspace} and we're on the {plan} plan.",
    ),
    "mobile app": (
        "I'm on app version {app_version} on my {device}.",
        "It happens on both my phone and a colleague's {device}.",
        "The account email is {email}.",
    ),
    "API": (
        "One failing request ID is {request_id}.",
        "We call the API from servers in {city}, in case the region matters.",
        "Our workspace is {workspace}, on the {plan} plan.",
    ),
    "reports": (
        "The report covers roughly {rows} rows for the current quarter.",
        "We're on the {plan} plan and about {seats} people use these reports.",
        "This is in workspace {workspace}.",
    ),
    "integrations": (
        "The workspace ID is {workspace}.",
        "We connected {integration} about a year ago and never had issues until now.",
        "About {seats} people on our sales team depend on the {integration} data.",
    ),
    "notifications": (
        "The account email is {email}.",
        "I'm using {browser} on desktop and the app on my {device}.",
        "Our team has {seats} users and all of them are affected.",
    ),
    "data export": (
        "The export contains around {rows} rows.",
        "Workspace ID: {workspace}.",
        "I'm using {browser} to download the file.",
    ),
}

# Things people say they already tried: lowercase gerund phrases, combined into sentences.
TRIED_GENERIC: tuple[str, ...] = (
    "checking your status page",
    "waiting an hour and retrying",
    "asking a colleague to try from their account",
    "following the steps in your help center article",
    "retrying at {hour}",
)
TRIED_WEB: tuple[str, ...] = (
    "clearing the cache and cookies",
    "using a private window",
    "switching to {browser}",
    "logging out and back in",
    "disabling our VPN and ad blocker",
)
TRIED_BY_PRODUCT: dict[str, tuple[str, ...]] = {
    "billing": ("re-entering the card details", "downloading the invoice again", "using a different card"),
    "login": ("requesting another reset link", "re-syncing the time on my authenticator app", "using the backup codes"),
    "mobile app": ("reinstalling the app", "restarting the phone", "switching between Wi-Fi and mobile data", "updating to {app_version}"),
    "API": ("rotating the API key", "adding retries with exponential backoff", "lowering our concurrency to {workers} workers", "reproducing it with plain curl"),
    "reports": ("narrowing the date range", "rebuilding the report from scratch", "duplicating the report"),
    "integrations": ("disconnecting and reconnecting {integration}", "running the sync manually", "re-authorizing with an admin account"),
    "notifications": ("checking the spam folder", "turning the notification settings off and on again", "whitelisting your sending domain"),
    "data export": ("exporting a smaller date range", "trying a different format", "starting the export again"),
}
TRIED_ONE: tuple[str, ...] = (
    "I already tried {a}, but it didn't help.",
    "I've tried {a} with the same result.",
    "We tried {a}, no luck.",
)
TRIED_MANY: tuple[str, ...] = (
    "So far I've tried {a}, {b} and {c}, and none of it made any difference.",
    "Before writing in, we tried {a}, then {b}, and finally {c}, but the problem is still there.",
    "I've already tried {a} and {b}, which didn't change anything.",
)

CONTEXT: tuple[str, ...] = (
    "We're a team of {seats} people on the {plan} plan.",
    "It started {when}.",
    "I'm writing on behalf of our finance and operations team.",
    "We've been customers for about three years and this is the first time something like this has happened.",
    "It first happened on {weekday} around {hour}.",
)
LONG_CONTEXT: tuple[str, ...] = (
    "For some background, we rely on this every day across {seats} users in {offices} offices, including our team in {city}, so even a short disruption means people are stuck and asking me what is going on.",
    "To be clear, nothing changed on our side as far as I know: same users, same permissions, same devices, and everything was working fine until {when}.",
    "I spent most of {weekday} afternoon trying to work out whether this was something on our end, going through our own settings, comparing with a colleague's account and reading the help center, but I couldn't find anything that explains it.",
    "We moved over to your platform earlier this year specifically because the previous tool kept having problems like this, so I'd really like to understand what's happening and whether it's likely to happen again.",
)
LONG_EXTRAS: tuple[str, ...] = (
    "I know these things can be hard to pin down, so here is what we've seen in more detail: it does not happen for every user or every time, it seems to get worse later in the day, and when it does happen the only thing that helps is waiting it out, which is not really an option for us with customers waiting on the other end.",
    "Just to give you an idea of the impact, our support and finance people spent the better part of yesterday double-checking everything by hand, two of our larger customers have already emailed to ask what is going on, and my manager has asked me for a written explanation by the end of the week.",
    "Our operations team has had to work around this manually, which so far has cost us several hours and a fair amount of goodwill with a couple of our own customers who noticed.",
    "I've attached a couple of screenshots and a short screen recording to this ticket, and I'm happy to jump on a quick call or share my screen if that makes it easier to reproduce.",
    "If it helps with debugging, it seems to happen more often in the morning our time, when most of the team logs in at once, but I can't say that for sure.",
)
IMPACT: tuple[str, ...] = (
    "This is blocking our whole team from working.",
    "We have a client deadline on {weekday}, so this is pretty urgent for us.",
    "It's not critical, but it's annoying.",
    "This is costing us real money every hour it's broken.",
    "Our month-end close depends on this.",
    "A few of our customers have already complained about it.",
)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "billing": (
        "Can you refund the duplicate charge?",
        "Could you send a corrected invoice?",
        "Is there a way to switch to monthly billing instead?",
    ),
    "login": (
        "Can you unlock the account or reset 2FA for me?",
        "Is something wrong with sign-in on your side right now?",
    ),
    "mobile app": (
        "Is there a known issue with this version?",
        "Should I reinstall, or would I lose data that hasn't synced yet?",
    ),
    "API": (
        "Did anything change on your side recently?",
        "Could you check your logs for our workspace?",
        "Is there a higher rate limit available on our plan?",
    ),
    "reports": (
        "Which timezone do the reports actually use?",
        "Can you re-send the scheduled report manually?",
    ),
    "integrations": (
        "Is this a known issue with {integration}?",
        "How do we remove the duplicates without deleting real records?",
    ),
    "notifications": (
        "How do I reduce the number of alerts without missing important ones?",
        "Can you check whether emails to our domain are bouncing?",
    ),
    "data export": (
        "Is there a size limit for exports?",
        "Could you generate the export on your side and send us a link?",
    ),
}
GENERIC_QUESTIONS: tuple[str, ...] = (
    "Can someone please look into this?",
    "Is there a workaround we can use in the meantime?",
    "When can we expect a fix?",
    "Do you need any other information from us?",
)
POLITE_CLOSERS: tuple[str, ...] = (
    "Thanks a lot for your help!",
    "Thank you in advance.",
    "Appreciate any help you can give.",
    "Thanks, and have a great day.",
)
FRUSTRATED_CLOSERS: tuple[str, ...] = (
    "This is the third time I'm contacting you about this and I still have no answer.",
    "Honestly, this is really frustrating.",
    "Please escalate this, we can't keep losing time on it.",
    "If this isn't fixed soon we'll have to look at other options.",
    "I've been waiting since {weekday} for a reply on case {case}.",
)
EMAIL_GREETINGS: tuple[str, ...] = (
    "Hi,", "Hello,", "Hi support team,", "Dear Support,", "Hi there,", "Good morning,",
)
EMAIL_SIGNOFFS: tuple[str, ...] = ("Best regards,", "Thanks,", "Cheers,", "Kind regards,", "Regards,")
CHAT_OPENERS: tuple[str, ...] = ("hi", "hey", "hello", "hi there", "quick question")
PHONE_PREFIXES: tuple[str, ...] = (
    "[Voicemail transcription]", "[Call transcript, auto-generated]", "[Phone call summary]",
)
EMOJIS: tuple[str, ...] = ("🙏", "😤", "🙂", "😕", "🔥", "👍", "😩")

# ------------------------------------------------------------------------------- other languages

LANGS: tuple[str, ...] = ("fr", "es", "de", "pt")
GERMAN_CONTRACTIONS: tuple[tuple[str, str], ...] = (
    (" zu der ", " zur "), (" zu dem ", " zum "), (" bei dem ", " beim "),
)
LANG_CITIES: dict[str, tuple[str, ...]] = {
    "fr": ("Montréal", "Lyon", "Bruxelles", "Genève"),
    "es": ("Bogotá", "Córdoba", "Madrid", "Málaga"),
    "de": ("München", "Zürich", "Düsseldorf", "Köln"),
    "pt": ("São Paulo", "Lisboa", "Porto Alegre", "Belém"),
}
LANG_PRODUCT: dict[str, dict[str, str]] = {
    "fr": {
        "billing": "la facturation", "login": "la connexion", "mobile app": "l'application mobile",
        "API": "l'API", "reports": "les rapports", "integrations": "l'intégration {integration}",
        "notifications": "les notifications", "data export": "l'export des données",
    },
    "es": {
        "billing": "la facturación", "login": "el inicio de sesión", "mobile app": "la app móvil",
        "API": "la API", "reports": "los informes", "integrations": "la integración con {integration}",
        "notifications": "las notificaciones", "data export": "la exportación de datos",
    },
    "de": {
        "billing": "der Abrechnung", "login": "dem Login", "mobile app": "der mobilen App",
        "API": "der API", "reports": "den Berichten", "integrations": "der {integration}-Integration",
        "notifications": "den Benachrichtigungen", "data export": "dem Datenexport",
    },
    "pt": {
        "billing": "o faturamento", "login": "o login", "mobile app": "o aplicativo",
        "API": "a API", "reports": "os relatórios", "integrations": "a integração com {integration}",
        "notifications": "as notificações", "data export": "a exportação de dados",
    },
}
LANG_SUBJECTS: dict[str, tuple[str, ...]] = {
    "fr": ("Problème avec {p}", "Urgent : erreur avec {p}", "Question concernant {p}"),
    "es": ("Problema con {p}", "Urgente: error con {p}", "Consulta sobre {p}"),
    "de": ("Problem mit {p}", "Dringend: Fehler bei {p}", "Frage zu {p}"),
    "pt": ("Problema com {p}", "Urgente: erro com {p}", "Dúvida sobre {p}"),
}
LANG_BODY: dict[str, dict[str, tuple[str, ...]]] = {
    "fr": {
        "greet": ("Bonjour,", "Bonjour à toute l'équipe,", "Madame, Monsieur,"),
        "problem": (
            "Depuis {weekday_l}, nous avons un problème avec {p} et rien ne fonctionne comme prévu.",
            "Nous rencontrons des erreurs répétées avec {p} depuis la dernière mise à jour.",
        ),
        "detail": (
            "Le message affiché est : « {err} ».",
            "Notre numéro de commande est {order} et notre espace de travail est {workspace}.",
            "Nous sommes une équipe de {seats} personnes basée à {city}.",
        ),
        "tried": (
            "Nous avons déjà vidé le cache et essayé un autre navigateur, sans succès.",
            "J'ai suivi les étapes de votre centre d'aide, mais le problème persiste.",
        ),
        "ask": (
            "Pourriez-vous regarder cela rapidement, s'il vous plaît ?",
            "Existe-t-il une solution de contournement en attendant ?",
        ),
        "close": ("Merci d'avance pour votre aide.", "Cordialement,\n{signer}"),
    },
    "es": {
        "greet": ("Hola,", "Buenos días,", "Estimado equipo de soporte,"),
        "problem": (
            "Desde el {weekday_l} tenemos un problema con {p} y no podemos trabajar con normalidad.",
            "Estamos recibiendo errores constantes con {p} desde la última actualización.",
        ),
        "detail": (
            "El mensaje que aparece es: «{err}».",
            "Nuestro número de pedido es {order} y el espacio de trabajo es {workspace}.",
            "Somos un equipo de {seats} personas en {city}.",
        ),
        "tried": (
            "Ya borramos la caché y probamos con otro navegador, pero sigue igual.",
            "Seguí los pasos del centro de ayuda y no se solucionó.",
        ),
        "ask": (
            "¿Podrían revisarlo lo antes posible, por favor?",
            "¿Hay alguna solución temporal mientras tanto?",
        ),
        "close": ("Muchas gracias de antemano.", "Saludos cordiales,\n{signer}"),
    },
    "de": {
        "greet": ("Hallo,", "Guten Tag,", "Sehr geehrtes Support-Team,"),
        "problem": (
            "Seit {weekday_l} haben wir ein Problem mit {p}, und unser Team kann kaum arbeiten.",
            "Wir bekommen seit dem letzten Update ständig Fehler bei {p}.",
        ),
        "detail": (
            "Die Fehlermeldung lautet: »{err}«.",
            "Unsere Bestellnummer ist {order}, der Workspace ist {workspace}.",
            "Wir sind ein Team von {seats} Personen in {city}.",
        ),
        "tried": (
            "Wir haben bereits den Cache geleert und einen anderen Browser ausprobiert, leider ohne Erfolg.",
            "Ich habe die Schritte aus Ihrem Hilfe-Center befolgt, aber das Problem besteht weiterhin.",
        ),
        "ask": (
            "Könnten Sie sich das bitte zeitnah ansehen?",
            "Gibt es in der Zwischenzeit einen Workaround?",
        ),
        "close": ("Vielen Dank im Voraus.", "Mit freundlichen Grüßen\n{signer}"),
    },
    "pt": {
        "greet": ("Olá,", "Bom dia,", "Prezada equipe de suporte,"),
        "problem": (
            "Desde {weekday_l} estamos com problema com {p} e a equipe não consegue trabalhar direito.",
            "Estamos recebendo erros constantes com {p} desde a última atualização.",
        ),
        "detail": (
            'A mensagem exibida é: "{err}".',
            "Nosso número de pedido é {order} e o workspace é {workspace}.",
            "Somos uma equipe de {seats} pessoas em {city}.",
        ),
        "tried": (
            "Já limpamos o cache e testamos outro navegador, sem sucesso.",
            "Segui os passos da central de ajuda, mas o problema continua.",
        ),
        "ask": (
            "Vocês poderiam verificar isso com urgência, por favor?",
            "Existe alguma solução temporária enquanto isso?",
        ),
        "close": ("Obrigado desde já.", "Atenciosamente,\n{signer}"),
    },
}
WEEKDAYS_LANG: dict[str, tuple[str, ...]] = {
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes"),
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag"),
    "pt": ("segunda-feira", "terça-feira", "quarta-feira", "quinta-feira", "sexta-feira"),
}
# fmt: on

# ------------------------------------------------------------------------------- assembly


def _make_customer(rng: random.Random) -> tuple[str, str, str]:
    """Return ``(customer, signer, email)``; a few percent use non-ASCII names."""
    intl = rng.random() < 0.08
    first = _pick(rng, FIRST_NAMES_INTL if intl and rng.random() < 0.7 else FIRST_NAMES)
    last = _pick(rng, LAST_NAMES_INTL if intl and rng.random() < 0.7 else LAST_NAMES)
    if rng.random() < 0.35:  # an individual customer
        mail_host = _pick(rng, ("gmail.com", "outlook.com", "proton.me", "yahoo.com", "icloud.com"))
        return f"{first} {last}", first, f"{_ascii_slug(first)}.{_ascii_slug(last)}@{mail_host}"
    if intl and rng.random() < 0.6:
        company = _pick(rng, COMPANIES_INTL)
    else:
        head, tail = _pick(rng, COMPANY_HEADS), _pick(rng, COMPANY_TAILS)
        company = f"{head} {tail}{_pick(rng, COMPANY_SUFFIXES)}"
    tld = _pick(rng, (".com", ".io", ".co", ".net", ".com"))
    email = f"{_ascii_slug(first)}@{_ascii_slug(company.split(' ')[0])}{tld}"
    signer = f"{first} {last}, {_pick(rng, CONTACT_ROLES)}" if rng.random() < 0.5 else first
    return company, signer, email


def _word_count(parts: list[str]) -> int:
    """Number of whitespace-separated words across ``parts``."""
    return sum(len(p.split()) for p in parts)


def _tried_sentence(rng: random.Random, product: str, channel: str, many: bool) -> str:
    """A 'what I already tried' sentence with one or three product-appropriate steps."""
    pool = TRIED_GENERIC + TRIED_BY_PRODUCT[product]
    if product != "mobile app" and channel != "phone":
        pool += TRIED_WEB
    a, b, c = rng.sample(pool, 3)
    template = _pick(rng, TRIED_MANY if many else TRIED_ONE)
    return template.format(a=a, b=b, c=c)


def _sentence_plan(
    rng: random.Random, product: str, channel: str, priority: str, slots: _Slots
) -> tuple[str, list[str], bool]:
    """Pick an issue and fill the core sentences of an English ticket.

    Returns ``(subject, sentences, frustrated)``; channel framing is added later.
    """
    issue = _pick_issue(rng, product)
    subject = _pick(rng, issue.subjects).format_map(slots)
    err = _pick(rng, issue.errors).format_map(slots)
    frames = ERROR_FRAMES + (ERROR_FRAMES_TECH if product in ("API", "integrations") else ())
    error_sentence = _pick(rng, frames).replace("{err}", err)
    if error_sentence[-1] not in ".!?":
        error_sentence += "."
    frustrated = (priority in ("high", "urgent") and rng.random() < 0.5) or rng.random() < 0.08
    closer = _pick(rng, FRUSTRATED_CLOSERS if frustrated else POLITE_CLOSERS)
    question = _pick(rng, QUESTIONS[product] + GENERIC_QUESTIONS)
    problem = _pick(rng, issue.problems)

    roll = rng.random()
    verbosity = "terse" if roll < (0.55 if channel == "chat" else 0.25) else "normal"
    if verbosity == "normal" and channel != "chat" and rng.random() < 0.25:
        verbosity = "verbose"

    # (probability, template); None marks the pre-formatted error sentence.
    plan: list[tuple[float, str | None]]
    if verbosity == "terse":
        plan = [(1.0, problem), (0.5, None), (0.4, question), (0.3, closer)]
    elif verbosity == "normal":
        plan = [
            (0.35, _pick(rng, CONTEXT)),
            (1.0, problem),
            (0.7, None),
            (0.55, _pick(rng, DETAILS[product])),
            (0.6, _tried_sentence(rng, product, channel, many=rng.random() < 0.3)),
            (0.3, _pick(rng, IMPACT)),
            (0.45, question),
            (0.6, closer),
        ]
    else:
        plan = [
            (0.8, _pick(rng, LONG_CONTEXT)),
            (1.0, problem),
            (0.85, None),
            (0.7, _pick(rng, DETAILS[product])),
            (0.9, _tried_sentence(rng, product, channel, many=True)),
            (0.6, _pick(rng, LONG_EXTRAS)),
            (0.4, _pick(rng, LONG_EXTRAS)),
            (0.5, _pick(rng, IMPACT)),
            (0.7, question),
            (0.7, closer),
        ]
    sentences: list[str] = []
    for prob, template in plan:
        if prob < 1.0 and rng.random() >= prob:
            continue
        text = error_sentence if template is None else template.format_map(slots)
        if text not in sentences:
            sentences.append(text)
    return subject, sentences, frustrated


def _pick_issue(rng: random.Random, product: str) -> _Issue:
    """Pick one issue family for ``product``."""
    issues = ISSUES[product]
    return issues[int(rng.random() * len(issues))]


def _english_ticket(
    rng: random.Random, product: str, channel: str, priority: str, slots: _Slots
) -> tuple[str, str]:
    """Build an English ``(subject, body)`` pair for one ticket."""
    subject, sentences, frustrated = _sentence_plan(rng, product, channel, priority, slots)
    if priority == "urgent" and rng.random() < 0.6:
        subject = _pick(rng, ("URGENT: ", "Urgent - ", "[URGENT] ")) + subject
    elif channel == "email" and rng.random() < 0.1:
        subject = "Re: " + subject

    # Pad very short tickets up to ~MIN_WORDS with detail/context right after the problem.
    pads = [
        _pick(rng, LONG_CONTEXT).format_map(slots),
        _pick(rng, CONTEXT).format_map(slots),
        _pick(rng, DETAILS[product]).format_map(slots),
    ]
    while (len(sentences) < 2 or _word_count(sentences) < MIN_WORDS) and pads:
        pad = pads.pop()
        if pad not in sentences:
            sentences.insert(1, pad)

    signer = slots["signer"]
    if channel == "chat":  # informal, lowercase opener, no sign-off
        sentences = sentences[:MAX_SENTENCES]
        first = sentences[0]
        if not first.startswith("I "):
            first = first[0].lower() + first[1:]
        body = " ".join([f"{_pick(rng, CHAT_OPENERS)}, {first}", *sentences[1:]])
        if frustrated and rng.random() < 0.3:
            body = body.rstrip(".!?") + "!!"
    elif channel == "phone":  # transcribed voicemail / call
        who = signer.split(",")[0]
        intro = f"{_pick(rng, PHONE_PREFIXES)} Hi, this is {who} calling from {slots['customer'].rstrip('.')}."
        core = sentences[: MAX_SENTENCES - 2]
        body = " ".join([intro, *core, "Please call me back when you can."])
    elif channel == "web":  # web form: plain text, sometimes multi-paragraph
        core = sentences[:MAX_SENTENCES]
        body = " ".join(core) if len(core) < 5 else " ".join(core[:3]) + "\n\n" + " ".join(core[3:])
    else:  # email: greeting, paragraph(s), sign-off on separate lines
        core = sentences[:MAX_SENTENCES]
        paras = [" ".join(core)] if len(core) < 5 else [" ".join(core[:3]), " ".join(core[3:])]
        greeting = _pick(rng, EMAIL_GREETINGS)
        body = "\n\n".join([greeting, *paras, f"{_pick(rng, EMAIL_SIGNOFFS)}\n{signer}"])
    while len(body.split()) > MAX_WORDS and ". " in body:  # defensive cap
        body = body[: body.rindex(". ") + 1]
    if rng.random() < EMOJI_SHARE:
        body += " " + _pick(rng, EMOJIS)
    return subject, body


def _foreign_ticket(rng: random.Random, product: str, slots: _Slots) -> tuple[str, str]:
    """Build a short French/Spanish/German/Portuguese ``(subject, body)`` pair."""
    lang = _pick(rng, LANGS)
    texts = LANG_BODY[lang]
    slots["city"] = _pick(rng, LANG_CITIES[lang])
    slots["weekday_l"] = _pick(rng, WEEKDAYS_LANG[lang])
    slots["p"] = LANG_PRODUCT[lang][product].format_map(slots)
    slots["err"] = _pick(rng, _pick_issue(rng, product).errors).format_map(slots)
    subject = _pick(rng, LANG_SUBJECTS[lang]).format_map(slots)
    details = list(texts["detail"])
    rng.shuffle(details)
    core = [_pick(rng, texts["problem"]), *details[: 1 + int(rng.random() * 3)]]
    if rng.random() < 0.7:
        core.append(_pick(rng, texts["tried"]))
    core.append(_pick(rng, texts["ask"]))
    parts = [_pick(rng, texts["greet"]), " ".join(core), _pick(rng, texts["close"])]
    body = "\n\n".join(parts).format_map(slots)
    if lang == "de":  # contract preposition + dative article: "zu dem" -> "zum" etc.
        for long, short in GERMAN_CONTRACTIONS:
            subject, body = subject.replace(long, short), body.replace(long, short)
    return subject, body


def make_tickets(n: int, seed: int = 7) -> Iterator[dict[str, str]]:
    """Yield ``n`` deterministic, realistic support tickets.

    Rows are produced lazily (constant memory). Ids run ``T-000001`` upwards and
    ``created_at`` increases with the id across October 2026 (UTC), whatever ``n``
    is. The same ``(n, seed)`` always gives identical output.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    width = max(6, len(str(n)))
    step = MONTH_SECONDS / max(n, 1)
    for i in range(n):
        customer, signer, email = _make_customer(rng)
        channel = rng.choices(CHANNELS, CHANNEL_WEIGHTS)[0]
        product = rng.choices(PRODUCTS, PRODUCT_WEIGHTS)[0]
        priority = rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]
        offset = min(int((i + rng.random()) * step), MONTH_SECONDS - 1)
        created = MONTH_START + timedelta(seconds=offset)
        slots = _Slots(rng, {"customer": customer, "signer": signer, "email": email})
        if rng.random() < FOREIGN_SHARE:
            if channel in ("chat", "phone"):  # foreign tickets are written: email/web
                channel = "email"
            subject, body = _foreign_ticket(rng, product, slots)
        else:
            subject, body = _english_ticket(rng, product, channel, priority, slots)
        yield {
            "id": f"T-{i + 1:0{width}d}",
            "customer": customer,
            "channel": channel,
            "product": product,
            "priority": priority,
            "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "subject": subject,
            "ticket": body,
        }


# ------------------------------------------------------------------------------- output


def write_files(n: int, jsonl_path: Path, parquet_path: Path | None = None, seed: int = 7) -> int:
    """Stream ``n`` tickets to JSONL (and optionally Parquet); return the row count.

    Parquet is written in row groups of ``PARQUET_BATCH_ROWS`` rows, all columns
    non-null UTF-8 strings in ``COLUMNS`` order.
    """
    pa: Any = None
    writer: Any = None
    if parquet_path is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([pa.field(c, pa.string(), nullable=False) for c in COLUMNS])
        writer = pq.ParquetWriter(parquet_path, schema)
    batch: dict[str, list[str]] = {c: [] for c in COLUMNS}

    def flush() -> None:
        if writer is not None and batch["id"]:
            writer.write_table(pa.Table.from_pydict(batch, schema=writer.schema))
            for values in batch.values():
                values.clear()

    count = 0
    try:
        with jsonl_path.open("w", encoding="utf-8", newline="\n") as out:
            for row in make_tickets(n, seed):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
                if writer is not None:
                    for c in COLUMNS:
                        batch[c].append(row[c])
                    if len(batch["id"]) >= PARQUET_BATCH_ROWS:
                        flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return count


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``make_tickets.py N OUT.jsonl [--parquet OUT.parquet] [--seed S]``."""
    parser = argparse.ArgumentParser(description="Generate realistic customer-support tickets.")
    parser.add_argument("n", type=int, help="number of tickets")
    parser.add_argument("jsonl", type=Path, help="output JSONL path")
    parser.add_argument("--parquet", type=Path, default=None, help="also write Parquet here")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("N must be >= 0")
    for path in (args.jsonl, args.parquet):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    rows = write_files(args.n, args.jsonl, args.parquet, args.seed)
    also = f" and {args.parquet}" if args.parquet else ""
    print(f"wrote {rows} tickets to {args.jsonl}{also}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
