/* The floor under a scheduler's cost per child: posix_spawn + wait of /bin/true, with
 * the child's stdout and stderr on pipes (read to end-of-file) and EXTRA descriptors held
 * open by the spawning process, as a service holds its logs, pipes and database. Prints
 * the spawner's CPU and the children's CPU per child (getrusage).
 *
 *   spawn-floor COUNT EXTRA_DESCRIPTORS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static double micros(struct timeval t) { return t.tv_sec * 1e6 + t.tv_usec; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s COUNT EXTRA_DESCRIPTORS\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[1]), extra = atoi(argv[2]);
    for (int i = 0; i < extra; i++) {
        if (open("/dev/null", O_RDONLY | O_CLOEXEC) < 0) {
            perror("open /dev/null (raise ulimit -n?)");
            return 1;
        }
    }
    struct rusage before, after, children;
    getrusage(RUSAGE_SELF, &before);
    for (int i = 0; i < count; i++) {
        int out[2], err[2];
        if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
            perror("pipe2");
            return 1;
        }
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, out[1], 1);
        posix_spawn_file_actions_adddup2(&actions, err[1], 2);
        posix_spawnattr_t attributes;
        posix_spawnattr_init(&attributes);
        posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP);
        posix_spawnattr_setpgroup(&attributes, 0);
        char *args[] = {"/bin/true", NULL};
        pid_t pid;
        if (posix_spawn(&pid, "/bin/true", &actions, &attributes, args, environ)) {
            perror("posix_spawn");
            return 1;
        }
        close(out[1]);
        close(err[1]);
        char buffer[256];
        while (read(out[0], buffer, sizeof buffer) > 0) {}
        while (read(err[0], buffer, sizeof buffer) > 0) {}
        close(out[0]);
        close(err[0]);
        int status;
        waitpid(pid, &status, 0);
        posix_spawn_file_actions_destroy(&actions);
        posix_spawnattr_destroy(&attributes);
    }
    getrusage(RUSAGE_SELF, &after);
    getrusage(RUSAGE_CHILDREN, &children);
    double spawner = micros(after.ru_utime) - micros(before.ru_utime) + micros(after.ru_stime) -
                     micros(before.ru_stime);
    double child = micros(children.ru_utime) + micros(children.ru_stime);
    printf("%d children, %d descriptors more: the spawner %.1f µs, the child %.1f µs of CPU per child\n",
           count, extra, spawner / count, child / count);
    return 0;
}
