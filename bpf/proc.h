/* safedeploy: who made a recorded call. The first event of a process captures its command
 * line and nearest ancestors into its cgroup's procs map. Task/mm field offsets come from
 * the running kernel's BTF at compile time (-DSD_OFF_*, ocihook/loader.py btf_offsets);
 * without them nothing is captured and the report says so. */
#ifndef SD_PROC_H
#define SD_PROC_H

#if defined(SD_OFF_TASK_GROUP_LEADER) && defined(SD_OFF_TASK_START_TIME)
/* Start time of a task's thread-group leader: with the tgid, it names one process
 * for the life of the machine (pids are reused, start times are not). */
static __always_inline __u64 sd_task_pstart(void *task)
{
    /* a BTF pointer: plain loads, checked by the verifier against the kernel's types (two
     * bpf_probe_read_kernel calls cost about a third of an allowed connect's program) */
    void *leader;
    __u64 start;
    if (!task)
        return 0;
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(leader) : "r"(task), "i"(SD_OFF_TASK_GROUP_LEADER));
    if (!leader)
        return 0;
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(start) : "r"(leader), "i"(SD_OFF_TASK_START_TIME));
    return start;
}

static __always_inline __u64 sd_current_pstart(void) { return sd_task_pstart(bpf_get_current_task_btf()); }
#else
static __always_inline __u64 sd_current_pstart(void) { return 0; }
#endif

/* Who runs on this CPU, for a decision made in its own syscall: the id of its cgroup (v2),
 * its tgid and its process start time. On this machine a helper call costs tens of ns (the
 * return mitigations), so all three come from one task pointer: a connect's program reads
 * them once and both finds the policy and records the call with them. */
struct sd_self {
    __u64 cgid;
    __u64 pstart;
    __u32 pid;
};

#if defined(SD_OFF_TASK_GROUP_LEADER) && defined(SD_OFF_TASK_START_TIME) && defined(SD_OFF_TASK_TGID) && \
    defined(SD_OFF_TASK_CGROUPS) && defined(SD_OFF_CSS_SET_DFL_CGRP) && defined(SD_OFF_CGROUP_KN) && \
    defined(SD_OFF_KERNFS_NODE_ID)
static __always_inline void sd_self_current(struct sd_self *s)
{
    void *task = bpf_get_current_task_btf();
    void *p;
    __u64 v = 0;
    __u32 pid = 0;
    s->cgid = 0;
    s->pstart = 0;
    s->pid = 0;
    if (!task)
        return;
    asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(pid) : "r"(task), "i"(SD_OFF_TASK_TGID));
    s->pid = pid;
    s->pstart = sd_task_pstart(task);
    /* task->cgroups->dfl_cgrp->kn->id: what bpf_get_current_cgroup_id() returns */
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(p) : "r"(task), "i"(SD_OFF_TASK_CGROUPS));
    if (!p)
        return;
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(p) : "r"(p), "i"(SD_OFF_CSS_SET_DFL_CGRP));
    if (!p)
        return;
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(p) : "r"(p), "i"(SD_OFF_CGROUP_KN));
    if (!p)
        return;
    asm volatile("%0 = *(u64 *)(%1 + %2)" : "=r"(v) : "r"(p), "i"(SD_OFF_KERNFS_NODE_ID));
    s->cgid = v;
}
#else
static __always_inline void sd_self_current(struct sd_self *s)
{
    s->cgid = bpf_get_current_cgroup_id();
    s->pid = bpf_get_current_pid_tgid() >> 32;
    s->pstart = sd_current_pstart();
}
#endif

/* The executable's path, walked up from mm->exe_file: dentry names through d_parent, and
 * across mounts through struct mount (mnt_parent, mnt_mountpoint), up to the root of the
 * task's mount tree (a container's own root: the path is the one the container sees).
 * Components are written last first; userspace reverses them. */
#if defined(SD_OFF_MM_EXE_FILE) && defined(SD_OFF_FILE_F_PATH) && defined(SD_OFF_PATH_MNT) && \
    defined(SD_OFF_PATH_DENTRY) && defined(SD_OFF_DENTRY_D_PARENT) && defined(SD_OFF_DENTRY_D_NAME) && \
    defined(SD_OFF_QSTR_NAME) && defined(SD_OFF_MOUNT_MNT) && defined(SD_OFF_MOUNT_MNT_PARENT) && \
    defined(SD_OFF_MOUNT_MNT_MOUNTPOINT) && defined(SD_OFF_VFSMOUNT_MNT_ROOT)
static __always_inline void sd_capture_exe(__u64 mm, struct sd_proc *p)
{
    __u64 file = 0, vfsmnt = 0, dentry = 0;
    p->exe_len = 0;
    p->exe_flags = 0;
    if (!mm)
        return;
    bpf_probe_read_kernel(&file, sizeof(file), (void *)(mm + SD_OFF_MM_EXE_FILE));
    if (!file)
        return;
    bpf_probe_read_kernel(&vfsmnt, sizeof(vfsmnt), (void *)(file + SD_OFF_FILE_F_PATH + SD_OFF_PATH_MNT));
    bpf_probe_read_kernel(&dentry, sizeof(dentry), (void *)(file + SD_OFF_FILE_F_PATH + SD_OFF_PATH_DENTRY));
    __u64 mnt = vfsmnt - SD_OFF_MOUNT_MNT;
    volatile __u32 *vpos = &p->exe_len; /* in map memory: the verifier sees an unknown length at each step */
    for (int i = 0; i < SD_EXE_DEPTH; i++) {
        __u64 root = 0, up = 0, name = 0;
        bpf_probe_read_kernel(&root, sizeof(root), (void *)(vfsmnt + SD_OFF_VFSMOUNT_MNT_ROOT));
        if (dentry == root) { /* the top of this mount: continue where it is mounted */
            __u64 parent = 0;
            bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(mnt + SD_OFF_MOUNT_MNT_PARENT));
            if (!parent || parent == mnt) {
                p->exe_flags = SD_EXE_COMPLETE;
                break;
            }
            bpf_probe_read_kernel(&dentry, sizeof(dentry), (void *)(mnt + SD_OFF_MOUNT_MNT_MOUNTPOINT));
            mnt = parent;
            vfsmnt = parent + SD_OFF_MOUNT_MNT;
            continue;
        }
        bpf_probe_read_kernel(&up, sizeof(up), (void *)(dentry + SD_OFF_DENTRY_D_PARENT));
        if (!up || up == dentry) {
            p->exe_flags = SD_EXE_COMPLETE;
            break;
        }
        __u32 pos = *vpos;
        if (pos >= SD_EXE - SD_EXE_PART)
            break;
        bpf_probe_read_kernel(&name, sizeof(name), (void *)(dentry + SD_OFF_DENTRY_D_NAME + SD_OFF_QSTR_NAME));
        int n = bpf_probe_read_kernel_str(&p->exe[pos & (SD_EXE - SD_EXE_PART - 1)], SD_EXE_PART, (void *)name);
        if (n <= 0)
            break;
        *vpos = pos + n;
        dentry = up;
    }
}
#else
static __always_inline void sd_capture_exe(__u64 mm, struct sd_proc *p)
{
    p->exe_len = 0;
    p->exe_flags = 0;
}
#endif

#if defined(SD_OFF_TASK_MM) && defined(SD_OFF_MM_ARG_START) && defined(SD_OFF_MM_ARG_END) && \
    defined(SD_OFF_TASK_REAL_PARENT) && defined(SD_OFF_TASK_TGID) && defined(SD_OFF_TASK_COMM)
static __always_inline void sd_capture_proc(__u64 cgid, __u32 tables, __u32 tgid, __u64 pstart)
{
    void *procs = cg_procs.lookup(&tables);
    if (!procs)
        return;
    struct sd_proc_key pk = {};
    pk.tgid = tgid;
    pk.pstart = pstart;
    if (bpf_map_lookup_elem(procs, &pk))
        return;
    __u32 zero = 0;
    struct sd_proc *p = procscratch.lookup(&zero);
    if (!p)
        return;
    __u64 task = bpf_get_current_task();
    __u64 mm = 0, start = 0, end = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + SD_OFF_TASK_MM));
    p->len = 0;
    if (mm) {
        bpf_probe_read_kernel(&start, sizeof(start), (void *)(mm + SD_OFF_MM_ARG_START));
        bpf_probe_read_kernel(&end, sizeof(end), (void *)(mm + SD_OFF_MM_ARG_END));
        if (end > start) {
            __u32 len = end - start > SD_CMDLINE ? SD_CMDLINE : end - start;
            len -= 1;
            _Static_assert(SD_CMDLINE == 256, "the command-line mask is 0xff");
            asm volatile("%0 &= 0xff" : "+r"(len));
            len += 1;
            if (bpf_probe_read_user(p->cmdline, len, (void *)start) == 0)
                p->len = len;
        }
    }
    sd_capture_exe(mm, p);
    p->chain_len = 0;
    __u64 cur = task;
    for (int i = 0; i < SD_CHAIN; i++) {
        __u64 parent = 0;
        bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(cur + SD_OFF_TASK_REAL_PARENT));
        if (!parent || parent == cur)
            break;
        bpf_probe_read_kernel(&p->chain[i].pid, sizeof(__u32), (void *)(parent + SD_OFF_TASK_TGID));
        bpf_probe_read_kernel(&p->chain[i].comm, 16, (void *)(parent + SD_OFF_TASK_COMM));
        p->chain_len = i + 1;
        cur = parent;
    }
    if (bpf_map_update_elem(procs, &pk, p, BPF_NOEXIST) == 0) {
        struct sd_cgstats *st = cgstats.lookup(&cgid);
        if (st)
            __sync_fetch_and_add(&st->procs_new, 1);
    }
}
#else
static __always_inline void sd_capture_proc(__u64 cgid, __u32 tables, __u32 tgid, __u64 pstart) {}
#endif

#endif /* SD_PROC_H */
