"""The Ray engine: ``batchrun run JOB.toml --engine ray`` (extra ``batchrun[ray]``).

The driver (the process that runs ``batchrun run``) does what the local engine
does before and after sending, with the same functions: it checks the key
variable, the input, the columns and the structured schema, opens the same
journal (``OUTPUT.partial/journal.jsonl``), and when every row has a result
writes the output with ``Journal.finish`` — the same schema and metadata as a
local run, written to a temporary name and renamed. Only the sending moves to
Ray, into three parts:

- ``driver``: reads the input with batchrun's reader (Ray Data's JSON reader
  would change the requests, and the input need not be reachable from the
  workers), hands the rows to the senders as they ask for them, and journals
  each result the moment it comes back; what it does to each row on the way
  out and to each result on the way back (pii, the job's ways, the failure
  watch) is ``rows``.
- ``sender``: ``RowSender`` actors (one per CPU of the cluster, at most one per
  request in flight), each sending its rows with batchrun's ``Scheduler`` for
  the whole job — the same retry policy, key probe, structured re-asks and
  records as a local run — with its share of the job's concurrency.
- ``coordinator``: one actor for the job that owns the rpm and tpm budgets, the
  429 pause, ``max_cost``'s reservations, auto concurrency and the circuit
  breaker; the senders lease from it in small amounts (``leases``), so no
  request waits on a remote call of its own.

What holds as in a local run:

- Durability per row: a row holds one of the job's ``concurrency`` places from
  its first request until the driver has journaled its result, so a crash of
  the driver (or of the whole Ray job) loses at most the requests in flight, and
  the same command, with either engine, resumes from the journal. A sender that
  dies hands its rows without a result to the others; a row whose result was
  journaled is never sent again.
- ``rpm``, ``tpm``, the pause when the API's rate limit is spent (a 429 with
  a remaining count of 0, or four in a row over every sender with no answer
  between; it pauses every sender), ``concurrency = "auto"`` (one adaptive
  limit for the job), ``max_cost`` (no request starts that could pass the
  budget; exit 4, resumable), ``api_down_after_s``, ``max_failures`` and the
  failure watch (``failures.FailureWatch``, fed by the driver with every
  sender's results; rows failed before the job's first answer are held on the
  driver, so a job it stops records none of them) act on the whole job, and
  the key is probed by one sender, one request at a time, before the others
  start.
- ``schema_via = "auto"``'s search and a refused ``stream_options``: the
  prober goes on alone until the ways are settled, its finds are kept by the
  driver and sent to every sender (``rows.Handoff``).
- ``pii``: the driver pseudonymizes; the senders get the placeholder text only
  (not the mapping, nor the hash made with it), and the driver restores every
  result before the journal.
- Retries and other events of the senders reach the driver's log (and
  ``--log-file``), marked with ``ray_actor``.

What differs: ``mode = "batch"`` or ``"hybrid"`` is refused; the journal and ``output`` live on the
driver's machine (with ``ray job submit``, the head node); ``--mock`` serves the
embedded endpoint from the driver on 127.0.0.1, which only actors on the same
machine can reach.

The API key reaches the senders as a constructor argument wrapped so that its
repr hides it: it is never in Ray's runtime environment (which the dashboard
shows), in a task or actor name, or in a log. Like every actor argument it is
pickled into Ray's object store (shared memory, spilled to the Ray session
folder if memory runs short) while the job runs.
"""

from batchrun.engines.ray.driver import INSTALL_HINT, actor_plan, import_ray, run_on_ray

__all__ = ["INSTALL_HINT", "actor_plan", "import_ray", "run_on_ray"]
