/* Fixture functions for the planner's unit tests (vmm/src/engine/plan/tests.rs). Each function is
 * there for the shape gcc -O2 gives it; keep them small and independent. Compiled and linked by
 * `fixtures_match_gcc` (see tests/fixtures.rs for the exact commands). */

long counter;

/* xor eax,eax; ret: 3 bytes, too short for any jump. */
int ret0(void) { return 0; }

/* A RIP-relative load as its first instruction; 8 bytes (too short for a 14-byte jump). */
long get_counter(void) { return counter; }

/* RIP-relative load, add, RIP-relative store. */
long bump(long x) {
    counter += x;
    return counter;
}

/* An early `test; je rel8` whose target is far from the displaced bytes. */
long first_or(const long *p) {
    if (!p)
        return -1;
    return *p + counter;
}

/* A conditional branch over one instruction: its target is the byte after it. */
long count_positive(long x) {
    if (x > 0)
        counter++;
    return x;
}

/* A counted loop: the loop head is a few instructions into the function. */
long sum(const long *p, long n) {
    long s = 0;
    for (long i = 0; i < n; i++)
        s += p[i];
    return s;
}

/* A loop that starts at the function's entry. */
void spin(volatile long *p) {
    while (*p)
        ;
}

__attribute__((noinline)) long helper(long x) { return x * 3 + 1; }

/* Calls in the middle of the function. */
long twice(long x) {
    long a = helper(x);
    return a + helper(a);
}

/* A call after a few instructions: a site ending with it can hold a 14-byte jump. */
long call_late(long x, long y) { return helper(x * 7 + y * 5) + x; }
