"""The key-value client's result decoding: values, the service's errors, the not-admitted result
(the replicas refused the request: its client is not admitted), and garbage."""

from __future__ import annotations

import pytest

from pbft.core.reconfig import NOT_ADMITTED_RESULT
from pbft.services.kv import KVClient, NotAdmittedResult, ServiceError, error_result, ok_result, unwrap_result


def test_results_decode_to_values_or_service_errors():
    assert unwrap_result(ok_result(b"v")) == b"v"
    assert unwrap_result(ok_result(None)) is None
    with pytest.raises(ServiceError, match="key too long") as e:
        unwrap_result(error_result("key too long"))
    assert not isinstance(e.value, NotAdmittedResult)


def test_the_not_admitted_result_is_its_own_error_not_a_malformed_one():
    with pytest.raises(NotAdmittedResult, match=r"not admitted by the cluster \(revoked or never added\)"):
        unwrap_result(NOT_ADMITTED_RESULT)
    assert issubclass(NotAdmittedResult, ServiceError)
    # (through KVClient over an invoke that returns results as they are)
    kv = KVClient(lambda op, read_only, timeout: NOT_ADMITTED_RESULT)
    with pytest.raises(NotAdmittedResult):
        kv.put(b"k", b"v")


@pytest.mark.parametrize("garbage", [b"", b"\xc1", NOT_ADMITTED_RESULT + b"x", NOT_ADMITTED_RESULT[:-1],
                                     ok_result(1)[:-1] + b"\x93"])
def test_garbage_is_a_malformed_result(garbage):
    with pytest.raises(ServiceError, match="malformed result") as e:
        unwrap_result(garbage)
    assert not isinstance(e.value, NotAdmittedResult)
