"""A replicated bank: an example service written only against the public ``pbft`` API.

Run it on a cluster (from the repository root, so that ``examples.bank`` imports)::

    pbft init bank-cluster --replicas 4
    PYTHONPATH=. pbft up bank-cluster --service examples.bank:BankService
    PYTHONPATH=. python -m examples.bank bank-cluster        # a short session, printed

Operations are msgpack lists; results are ``["ok", value]`` or ``["err", reason]``:

=====================================  ======================================  ==========
operation                              ok result                               who
=====================================  ======================================  ==========
``["open", name]``                     ``None``                                anybody
``["deposit", name, amount]``          new balance                             anybody
``["withdraw", name, amount]``         new balance                             the owner
``["transfer", src, dst, amount]``     new balance of ``src``                  src's owner
``["balance", name]``                  balance (read-only allowed)             anybody
``["total"]``                          ``[accounts, sum of balances]`` (r-o)   anybody
=====================================  ======================================  ==========

The client that opens an account owns it.  ``client`` in ``execute`` is the
id the library authenticated (every request carries MACs from the client's
session keys), so a client cannot act as another one: that is the whole
access-control story, and it needs no signatures in operations.

What makes this a correct ``pbft.Service``:

* **deterministic**: the result and the new state depend only on the state,
  the operation and the client id: no clock, no randomness, no iteration over
  unordered containers, integers only (no floats);
* **untrusted input**: operation bytes come from clients, some of which may be
  faulty or malicious.  Every malformed or refused operation is an error
  *result*; ``execute`` never raises (an exception would stop the replica);
* **read-only calls do not mutate**: ``execute(..., read_only=True)`` refuses
  the mutating operations;
* **bounded**: names, amounts, balances and the number of accounts are
  bounded, so neither the state nor one operation can grow without limit;
* **canonical state**: ``get_state`` sorts the accounts, so two replicas with
  the same accounts produce the same bytes (checkpoint digests are compared
  across replicas); ``set_state`` checks what it is given and raises
  ``ValueError`` on anything ``get_state`` could not have produced.
"""

from __future__ import annotations

import sys

import msgpack

from pbft import Service

NAME_LEN_MAX = 64  # characters
AMOUNT_MAX = 10**12  # per operation
BALANCE_MAX = 10**13  # per account
ACCOUNTS_MAX = 100_000  # so the sum of all balances (the "total" result) stays below 2**63,
#                         which msgpack can encode: an OverflowError in execute would stop the replica
STATE_VERSION = 1

MUTATING = frozenset({"open", "deposit", "withdraw", "transfer"})
# kind -> number of arguments after the kind
ARITY = {"open": 1, "deposit": 2, "withdraw": 2, "transfer": 3, "balance": 1, "total": 0}


# ---- encoding (shared by the service and its clients) ---------------------------

def encode_op(kind: str, *args) -> bytes:
    """``encode_op("transfer", "alice", "bob", 5)`` -> the operation bytes."""
    return msgpack.packb([kind, *args], use_bin_type=True)


def _ok(value) -> bytes:
    return msgpack.packb(["ok", value], use_bin_type=True)


def _err(reason: str) -> bytes:
    return msgpack.packb(["err", reason], use_bin_type=True)


def decode_result(result: bytes):
    """``("ok", value)`` or ``("err", reason)``; raises ``ValueError`` on anything else."""
    try:
        r = msgpack.unpackb(result, raw=False, use_list=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types
        raise ValueError("malformed result") from e
    if not (isinstance(r, tuple) and len(r) == 2 and r[0] in ("ok", "err")):
        raise ValueError("malformed result")
    return r


def _is_name(x) -> bool:
    return type(x) is str and 0 < len(x) <= NAME_LEN_MAX


def _is_amount(x) -> bool:
    return type(x) is int and 0 < x <= AMOUNT_MAX  # type(): True is an int, but not an amount


# ---- the service ------------------------------------------------------------------

class BankService(Service):
    """Accounts ``name -> (owner client id, balance)``.  Constructed without arguments,
    as ``pbft replica --service examples.bank:BankService`` requires."""

    def __init__(self) -> None:
        self.accounts: dict[str, list[int]] = {}  # name -> [owner, balance]

    def execute(self, operation: bytes, client: int, nondet: bytes, read_only: bool) -> bytes:
        try:
            op = msgpack.unpackb(operation, raw=False, use_list=False, max_str_len=NAME_LEN_MAX * 4,
                                 max_bin_len=0, max_array_len=4, max_map_len=0, max_ext_len=0)
        except Exception:  # noqa: BLE001 - garbage from a client: an error result, never a crash
            return _err("malformed operation")
        if type(op) is not tuple or not op or type(op[0]) is not str:
            return _err("malformed operation")
        kind, args = op[0], op[1:]
        if ARITY.get(kind) != len(args):
            return _err(f"unknown operation or wrong number of arguments: {kind[:16]!r}")
        if read_only and kind in MUTATING:
            return _err("mutating operation sent as read-only")
        if kind == "total":
            return _ok([len(self.accounts), sum(b for _, b in self.accounts.values())])
        if not all(_is_name(a) for a in args[:2 if kind == "transfer" else 1]):
            return _err("invalid account name")
        if kind in ("deposit", "withdraw", "transfer") and not _is_amount(args[-1]):
            return _err("invalid amount")
        name = args[0]
        acct = self.accounts.get(name)
        if kind == "open":
            if acct is not None:
                return _err("account exists")
            if len(self.accounts) >= ACCOUNTS_MAX:
                return _err("too many accounts")
            self.accounts[name] = [client, 0]
            return _ok(None)
        if acct is None:
            return _err("no such account")
        if kind == "balance":
            return _ok(acct[1])
        if kind == "deposit":
            if acct[1] + args[1] > BALANCE_MAX:
                return _err("balance limit")
            acct[1] += args[1]
            return _ok(acct[1])
        # withdraw and transfer move money out of an account: only its owner may
        if acct[0] != client:
            return _err("not the owner")
        amount = args[-1]
        if acct[1] < amount:
            return _err("insufficient funds")
        if kind == "withdraw":
            acct[1] -= amount
            return _ok(acct[1])
        dst = self.accounts.get(args[1])
        if dst is None:
            return _err("no such account")
        if dst is acct:
            return _err("transfer to the same account")
        if dst[1] + amount > BALANCE_MAX:
            return _err("balance limit")
        acct[1] -= amount
        dst[1] += amount
        return _ok(acct[1])

    # Non-determinism: the bank needs none, so the defaults of pbft.Service stay
    # (propose b"", accept only b"").  See pbft.services.kv for a service that agrees on time.

    def get_state(self) -> bytes:
        rows = [[name, owner, balance] for name, (owner, balance) in sorted(self.accounts.items())]
        return msgpack.packb([STATE_VERSION, rows], use_bin_type=True)

    def set_state(self, data: bytes) -> None:
        try:
            version, rows = msgpack.unpackb(data, raw=False, use_list=False, max_bin_len=0, max_ext_len=0,
                                            max_map_len=0)
        except Exception as e:  # noqa: BLE001
            raise ValueError("not a bank state") from e
        if type(version) is not int or version != STATE_VERSION \
                or type(rows) is not tuple or len(rows) > ACCOUNTS_MAX:
            raise ValueError("not a bank state")
        accounts: dict[str, list[int]] = {}
        prev = None
        for row in rows:
            if type(row) is not tuple or len(row) != 3:
                raise ValueError("not a bank state")
            name, owner, balance = row
            if not _is_name(name) or type(owner) is not int or owner < 0 \
                    or type(balance) is not int or not 0 <= balance <= BALANCE_MAX:
                raise ValueError("not a bank state")
            if prev is not None and name <= prev:  # sorted and unique: the canonical form
                raise ValueError("not a bank state")
            prev = name
            accounts[name] = [owner, balance]
        self.accounts = accounts


# ---- a typed client -----------------------------------------------------------------

class BankError(Exception):
    """The bank refused an operation; the message is its reason."""


class BankClient:
    """Typed calls over any ``invoke(op, read_only=..., timeout=...) -> bytes``.

    With ``pbft.BlockingClient``::

        with pbft.BlockingClient("bank-cluster") as bc:
            bank = BankClient(bc.invoke)
            bank.open("alice")
            bank.deposit("alice", 100)

    Errors of the bank raise ``BankError``; no certified answer in time raises
    ``pbft.NoQuorumError`` (from ``invoke``).
    """

    def __init__(self, invoke, timeout: float | None = 10.0):
        self._invoke = invoke
        self.timeout = timeout

    def _call(self, op: bytes, read_only: bool = False):
        result = self._invoke(op, read_only=read_only, timeout=self.timeout)
        try:
            status, value = decode_result(result)
        except ValueError:
            raise BankError("malformed result from the service") from None
        if status == "err":
            raise BankError(value)
        return value

    def open(self, name: str) -> None:
        self._call(encode_op("open", name))

    def deposit(self, name: str, amount: int) -> int:
        return self._call(encode_op("deposit", name, amount))

    def withdraw(self, name: str, amount: int) -> int:
        return self._call(encode_op("withdraw", name, amount))

    def transfer(self, src: str, dst: str, amount: int) -> int:
        return self._call(encode_op("transfer", src, dst, amount))

    def balance(self, name: str, read_only: bool = True) -> int:
        return self._call(encode_op("balance", name), read_only)

    def total(self, read_only: bool = True) -> tuple[int, int]:
        accounts, total = self._call(encode_op("total"), read_only)
        return accounts, total


# ---- a short session against a running cluster ---------------------------------------

def main(argv: list[str]) -> int:
    import pbft

    if len(argv) != 1:
        print("usage: python -m examples.bank CLUSTER_DIR   (replicas run --service examples.bank:BankService)",
              file=sys.stderr)
        return 2
    try:
        with pbft.BlockingClient(argv[0]) as bc:
            bank = BankClient(bc.invoke)
            for name in ("alice", "bob"):
                try:
                    bank.open(name)
                    print(f"opened {name} (owner: client {bc.id})")
                except BankError as e:
                    print(f"open {name}: {e}")
            print(f"deposit 100 to alice: balance {bank.deposit('alice', 100)}")
            print(f"transfer 30 alice -> bob: alice has {bank.transfer('alice', 'bob', 30)}")
            try:
                bank.withdraw("bob", 10**6)
            except BankError as e:
                print(f"withdraw 1000000 from bob: refused ({e})")
            print(f"balances (read-only): alice {bank.balance('alice')}, bob {bank.balance('bob')}")
            accounts, total = bank.total()
            print(f"{accounts} accounts, {total} in total")
    except (pbft.PbftError, pbft.ConfigError) as e:
        print(f"bank: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
