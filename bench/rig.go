package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
)

// caddyfile is the Caddyfile of a harness instance: a global block with the
// admin API, automatic HTTPS and config persistence off, the storage
// option storage (what follows "storage": see fileSystem and lagged; none
// if empty), the options global, and errors-only logging; then the site
// http://127.0.0.1:port holding site. global and site are written as they
// stand in the file, tab-indented one level; the newlines around them do
// not matter.
func caddyfile(storage string, port int, global, site string) string {
	var sb strings.Builder
	sb.WriteString("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n")
	if storage != "" {
		fmt.Fprintf(&sb, "\tstorage %s\n", storage)
	}
	if global = strings.Trim(global, "\n"); global != "" {
		sb.WriteString(global + "\n")
	}
	fmt.Fprintf(&sb, "\tlog {\n\t\tlevel ERROR\n\t}\n}\nhttp://127.0.0.1:%d {\n%s\n}", port, strings.Trim(site, "\n"))
	return sb.String()
}

// fileSystem is the storage option of Caddy's file system storage in dir.
func fileSystem(dir string) string { return "file_system " + dir }

// lagged is the storage option of batch_lag (internal/lagstore) in dir:
// the file system storage, every call waiting latency first and counted.
// At latency 0 it only counts. A site reads the counts of its process
// with the directive batch_storage_calls (see storageCalls).
func lagged(dir string, latency time.Duration) string {
	return fmt.Sprintf("batch_lag %s {\n\t\tlatency %s\n\t}", dir, latency)
}

// callsPath is where the sites of the storage and cluster scenarios answer
// their process's storage calls.
const callsPath = "/storage-calls"

// storageCalls reads the storage calls a Caddy with batch_lag storage has
// counted, from callsPath.
func storageCalls(client *http.Client, base string) (lagstore.Counts, error) {
	var c lagstore.Counts
	out, status, _, err := send(client, http.MethodGet, base+callsPath, "", "", "")
	if err != nil || status != http.StatusOK {
		return c, fmt.Errorf("storage calls: %d %v %.200s", status, err, out)
	}
	return c, json.Unmarshal([]byte(out), &c)
}

// rig is a Caddy started by startRig.
type rig struct {
	child   *exec.Cmd
	base    string // http://127.0.0.1:port
	client  *http.Client
	storage string // its storage directory, "" for none
}

// startRig launches Caddy (see launch) on a free port with the caddyfile of
// global and site, and its file system storage in a new temporary
// directory named after storage, or none if storage is empty. The cleanup
// stops Caddy, then removes the directory.
func startRig(storage, global, site string, concurrency int, probe string) (rig, func(), error) {
	if storage == "" {
		return startRigIn("", "", global, site, concurrency, probe)
	}
	dir, err := os.MkdirTemp("", storage)
	if err != nil {
		return rig{}, nil, err
	}
	r, stop, err := startRigIn(dir, fileSystem(dir), global, site, concurrency, probe)
	if err != nil {
		os.RemoveAll(dir)
		return rig{}, nil, err
	}
	return r, func() { stop(); os.RemoveAll(dir) }, nil
}

// startRigIn launches Caddy as startRig does, with the storage option
// storage over dir, which stays the caller's to remove: several rigs may
// share it. It returns what stops Caddy.
func startRigIn(dir, storage, global, site string, concurrency int, probe string) (rig, func(), error) {
	r := rig{storage: dir}
	port, err := freePort()
	if err != nil {
		return rig{}, nil, err
	}
	var stop func()
	r.child, r.base, r.client, stop, err = launch(caddyfile(storage, port, global, site), port, concurrency, probe)
	if err != nil {
		return rig{}, nil, err
	}
	return r, stop, nil
}
