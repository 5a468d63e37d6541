"""Generated from bpf/abi.h by ``python -m ocihook.abigen``. DO NOT EDIT."""
from . import cdata

# constants
SD_MAX_DEPTH = 16
SD_MAX_TABLES = 16384
SD_RULE_DEFAULT = 0xffff
SD_RULE_RESOLVERS = 0xfffe
SD_RULE_MALFORMED = 0xfffd
SD_RULE_RAW = 0xfffc
SD_RULE_SRCROUTE = 0xfffb
SD_RULE_PROTOCOL = 0xfffa
SD_RULE_SERVE_DNS = 0xfff9
SD_RULE_ANSWER_CUT = 0xfff8
SD_RULE_UNLISTED = 0xfff7
SD_RULE_ZEROCOPY = 0xfff6
SD_ALLOW = 0
SD_DENY = 1
SD_MODE_ENFORCE = 0
SD_MODE_AUDIT = 1
SD_EV_ALLOWED = 0
SD_EV_BLOCKED = 1
SD_EV_WOULD_BLOCK = 2
SD_KIND_CONNECT = 1
SD_KIND_SENDMSG = 2
SD_KIND_DNS = 3
SD_KIND_SOCKET = 4
SD_KIND_PACKET = 5
SD_KIND_BIND = 6
SD_KIND_SOCKOPT = 7
SD_PROTO_OTHER = 255
SD_IPPROTO_UDPLITE = 136
SD_IPPROTO_MPTCP = 262
SD_STAT_EVENTS_DROPPED = 0
SD_STAT_DECISIONS = 1
SD_STAT_DENIED = 2
SD_STAT_DNS_MALFORMED = 3
SD_STAT_LIVE_UNREAD = 4
SD_STAT_ANSWERS_CUT = 5
SD_STAT_STREAM_REORDERED = 6
SD_STAT_STREAM_LOST = 7
SD_NSTATS = 8
SD_CIDR_FIXED_BITS = 32
SD_NAME_KEY = 252
SD_NAME_MAX = 251
SD_NAME_BUF = 256
SD_NAME_FIXED_BITS = 32
SD_TTL_MIN_S = 2
SD_TTL_MAX_S = 86400
SD_MAX_ANSWERS = 256
SD_STORE_PER_CALL = 64
SD_RECORDS_PER_CALL = 16
SD_TAIL_BUDGET = 33
SD_TAIL_ANSWERS = 0
SD_TAIL_LEARN = 1
SD_TAIL_RX = 2
SD_ETAIL_QUERY = 0
SD_ETAIL_VERDICT = 1
SD_NETAILS = 2
SD_TAIL_BEGIN = 3
SD_TAIL_STORE = 4
SD_NTAILS = 5
SD_MSGBUF = 8192
SD_EVF_EXPIRED = 1
SD_REFUSALS = 64
SD_REFUSAL_Q = 260
SD_CMDLINE = 256
SD_CHAIN = 4
SD_EXE = 256
SD_EXE_PART = 128
SD_EXE_DEPTH = 32
SD_EXE_COMPLETE = 1


class Cgroup(cdata.Structure):
    """struct sd_cgroup"""
    _fields_ = [
        ("mode", cdata.c_uint8),
        ("dflt", cdata.c_uint8),
        ("has_resolvers", cdata.c_uint8),
        ("name_denies", cdata.c_uint8),
        ("allow_raw", cdata.c_uint8),
        ("unlisted", cdata.c_uint8),
        ("allow_srcroute", cdata.c_uint8),
        ("serve_dns", cdata.c_uint8),
        ("min_ttl", cdata.c_uint32),
        ("connect_errno", cdata.c_uint32),
        ("protos", cdata.c_uint8 * 32),
        ("unlisted_errno", cdata.c_uint32),
        ("tables", cdata.c_uint32),
    ]


class Cgstats(cdata.Structure):
    """struct sd_cgstats"""
    _fields_ = [
        ("allowed", cdata.c_uint64),
        ("blocked", cdata.c_uint64),
        ("would_block", cdata.c_uint64),
        ("events_dropped", cdata.c_uint64),
        ("blocked_dropped", cdata.c_uint64),
        ("learned_new", cdata.c_uint64),
        ("pending_new", cdata.c_uint64),
        ("names_new", cdata.c_uint64),
        ("procs_new", cdata.c_uint64),
        ("pending_busy", cdata.c_uint64),
    ]


class CidrKey(cdata.Structure):
    """struct sd_cidr_key"""
    _fields_ = [
        ("prefixlen", cdata.c_uint32),
        ("proto", cdata.c_uint8),
        ("pad", cdata.c_uint8),
        ("port", cdata.c_uint16),
        ("addr", cdata.c_uint32 * 4),
    ]


class CidrVal(cdata.Structure):
    """struct sd_cidr_val"""
    _fields_ = [
        ("rule", cdata.c_uint16),
        ("verdict", cdata.c_uint8),
        ("plen", cdata.c_uint8),
    ]


class Addr(cdata.Structure):
    """struct sd_addr"""
    _fields_ = [
        ("addr", cdata.c_uint32 * 4),
    ]


class NameKey(cdata.Structure):
    """struct sd_name_key"""
    _fields_ = [
        ("prefixlen", cdata.c_uint32),
        ("proto", cdata.c_uint8),
        ("pad", cdata.c_uint8),
        ("port", cdata.c_uint16),
        ("name", cdata.c_uint8 * 252),
    ]


class NameVal(cdata.Structure):
    """struct sd_name_val"""
    _fields_ = [
        ("rule", cdata.c_uint16),
        ("verdict", cdata.c_uint8),
        ("pad", cdata.c_uint8),
        ("nlen", cdata.c_uint32),
    ]


class QidKey(cdata.Structure):
    """struct sd_qid_key"""
    _fields_ = [
        ("name", cdata.c_uint8 * 252),
    ]


class Learned(cdata.Structure):
    """struct sd_learned"""
    _fields_ = [
        ("expires_ns", cdata.c_uint64),
        ("name_id", cdata.c_uint32),
        ("target_id", cdata.c_uint32),
        ("verdict", cdata.c_uint8),
        ("pad", cdata.c_uint8),
        ("rule", cdata.c_uint16),
        ("pad2", cdata.c_uint32),
    ]


class Answer(cdata.Structure):
    """struct sd_answer"""
    _fields_ = [
        ("a", cdata.c_uint32 * 4),
        ("ttl", cdata.c_uint32),
    ]


class PendingKey(cdata.Structure):
    """struct sd_pending_key"""
    _fields_ = [
        ("addr", cdata.c_uint32 * 4),
        ("txid", cdata.c_uint16),
        ("pad", cdata.c_uint16),
        ("name_id", cdata.c_uint32),
    ]


class PendingVal(cdata.Structure):
    """struct sd_pending_val"""
    _fields_ = [
        ("pstart", cdata.c_uint64),
        ("pid", cdata.c_uint32),
        ("uid", cdata.c_uint32),
        ("comm", cdata.c_char * 16),
    ]


class EventKey(cdata.Structure):
    """struct sd_event_key"""
    _fields_ = [
        ("pstart", cdata.c_uint64),
        ("addr", cdata.c_uint32 * 4),
        ("pid", cdata.c_uint32),
        ("port", cdata.c_uint16),
        ("rule", cdata.c_uint16),
        ("verdict", cdata.c_uint8),
        ("kind", cdata.c_uint8),
        ("proto", cdata.c_uint8),
        ("family", cdata.c_uint8),
        ("name_id", cdata.c_uint32),
        ("target_id", cdata.c_uint32),
        ("flags", cdata.c_uint8),
        ("pad", cdata.c_uint8 * 3),
    ]


class EventVal(cdata.Structure):
    """struct sd_event_val"""
    _fields_ = [
        ("count", cdata.c_uint64),
        ("first_ns", cdata.c_uint64),
        ("last_ns", cdata.c_uint64),
        ("uid", cdata.c_uint32),
        ("pad", cdata.c_uint32),
        ("comm", cdata.c_char * 16),
    ]


class Refusal(cdata.Structure):
    """struct sd_refusal"""
    _fields_ = [
        ("client", cdata.c_uint32 * 4),
        ("resolver", cdata.c_uint32 * 4),
        ("cport", cdata.c_uint16),
        ("rport", cdata.c_uint16),
        ("txid", cdata.c_uint16),
        ("flags", cdata.c_uint8),
        ("family", cdata.c_uint8),
        ("qlen", cdata.c_uint16),
        ("q", cdata.c_uint8 * 260),
        ("pad", cdata.c_uint8 * 2),
    ]


class Live(cdata.Structure):
    """struct sd_live"""
    _fields_ = [
        ("cgid", cdata.c_uint64),
        ("k", EventKey),
        ("ts_ns", cdata.c_uint64),
        ("comm", cdata.c_char * 16),
    ]


class ProcKey(cdata.Structure):
    """struct sd_proc_key"""
    _fields_ = [
        ("pstart", cdata.c_uint64),
        ("tgid", cdata.c_uint32),
        ("pad", cdata.c_uint32),
    ]


class Ancestor(cdata.Structure):
    """struct sd_ancestor"""
    _fields_ = [
        ("pid", cdata.c_uint32),
        ("comm", cdata.c_char * 16),
    ]


class Proc(cdata.Structure):
    """struct sd_proc"""
    _fields_ = [
        ("len", cdata.c_uint32),
        ("chain_len", cdata.c_uint32),
        ("chain", Ancestor * 4),
        ("cmdline", cdata.c_uint8 * 256),
        ("exe_len", cdata.c_uint32),
        ("exe_flags", cdata.c_uint32),
        ("exe", cdata.c_uint8 * 256),
    ]


# struct -> (size, {field: (offset, size)}) as C lays it out
LAYOUT = {
    "sd_cgroup": (56, {'mode': (0, 1), 'dflt': (1, 1), 'has_resolvers': (2, 1), 'name_denies': (3, 1), 'allow_raw': (4, 1), 'unlisted': (5, 1), 'allow_srcroute': (6, 1), 'serve_dns': (7, 1), 'min_ttl': (8, 4), 'connect_errno': (12, 4), 'protos': (16, 32), 'unlisted_errno': (48, 4), 'tables': (52, 4)}),
    "sd_cgstats": (80, {'allowed': (0, 8), 'blocked': (8, 8), 'would_block': (16, 8), 'events_dropped': (24, 8), 'blocked_dropped': (32, 8), 'learned_new': (40, 8), 'pending_new': (48, 8), 'names_new': (56, 8), 'procs_new': (64, 8), 'pending_busy': (72, 8)}),
    "sd_cidr_key": (24, {'prefixlen': (0, 4), 'proto': (4, 1), 'pad': (5, 1), 'port': (6, 2), 'addr': (8, 16)}),
    "sd_cidr_val": (4, {'rule': (0, 2), 'verdict': (2, 1), 'plen': (3, 1)}),
    "sd_addr": (16, {'addr': (0, 16)}),
    "sd_name_key": (260, {'prefixlen': (0, 4), 'proto': (4, 1), 'pad': (5, 1), 'port': (6, 2), 'name': (8, 252)}),
    "sd_name_val": (8, {'rule': (0, 2), 'verdict': (2, 1), 'pad': (3, 1), 'nlen': (4, 4)}),
    "sd_qid_key": (252, {'name': (0, 252)}),
    "sd_learned": (24, {'expires_ns': (0, 8), 'name_id': (8, 4), 'target_id': (12, 4), 'verdict': (16, 1), 'pad': (17, 1), 'rule': (18, 2), 'pad2': (20, 4)}),
    "sd_answer": (20, {'a': (0, 16), 'ttl': (16, 4)}),
    "sd_pending_key": (24, {'addr': (0, 16), 'txid': (16, 2), 'pad': (18, 2), 'name_id': (20, 4)}),
    "sd_pending_val": (32, {'pstart': (0, 8), 'pid': (8, 4), 'uid': (12, 4), 'comm': (16, 16)}),
    "sd_event_key": (48, {'pstart': (0, 8), 'addr': (8, 16), 'pid': (24, 4), 'port': (28, 2), 'rule': (30, 2), 'verdict': (32, 1), 'kind': (33, 1), 'proto': (34, 1), 'family': (35, 1), 'name_id': (36, 4), 'target_id': (40, 4), 'flags': (44, 1), 'pad': (45, 3)}),
    "sd_event_val": (48, {'count': (0, 8), 'first_ns': (8, 8), 'last_ns': (16, 8), 'uid': (24, 4), 'pad': (28, 4), 'comm': (32, 16)}),
    "sd_refusal": (304, {'client': (0, 16), 'resolver': (16, 16), 'cport': (32, 2), 'rport': (34, 2), 'txid': (36, 2), 'flags': (38, 1), 'family': (39, 1), 'qlen': (40, 2), 'q': (42, 260), 'pad': (302, 2)}),
    "sd_live": (80, {'cgid': (0, 8), 'k': (8, 48), 'ts_ns': (56, 8), 'comm': (64, 16)}),
    "sd_proc_key": (16, {'pstart': (0, 8), 'tgid': (8, 4), 'pad': (12, 4)}),
    "sd_ancestor": (20, {'pid': (0, 4), 'comm': (4, 16)}),
    "sd_proc": (608, {'len': (0, 4), 'chain_len': (4, 4), 'chain': (8, 80), 'cmdline': (88, 256), 'exe_len': (344, 4), 'exe_flags': (348, 4), 'exe': (352, 256)}),
}

STRUCTS = {
    "sd_cgroup": Cgroup,
    "sd_cgstats": Cgstats,
    "sd_cidr_key": CidrKey,
    "sd_cidr_val": CidrVal,
    "sd_addr": Addr,
    "sd_name_key": NameKey,
    "sd_name_val": NameVal,
    "sd_qid_key": QidKey,
    "sd_learned": Learned,
    "sd_answer": Answer,
    "sd_pending_key": PendingKey,
    "sd_pending_val": PendingVal,
    "sd_event_key": EventKey,
    "sd_event_val": EventVal,
    "sd_refusal": Refusal,
    "sd_live": Live,
    "sd_proc_key": ProcKey,
    "sd_ancestor": Ancestor,
    "sd_proc": Proc,
}
