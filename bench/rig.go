package main

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
)

// caddyfile is the Caddyfile of a harness instance: a global block with the
// admin API, automatic HTTPS and config persistence off, file-system
// storage in storage (none if empty), the options global, and errors-only
// logging; then the site http://127.0.0.1:port holding site. global and
// site are written as they stand in the file, tab-indented one level; the
// newlines around them do not matter.
func caddyfile(storage string, port int, global, site string) string {
	var sb strings.Builder
	sb.WriteString("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n")
	if storage != "" {
		fmt.Fprintf(&sb, "\tstorage file_system %s\n", storage)
	}
	if global = strings.Trim(global, "\n"); global != "" {
		sb.WriteString(global + "\n")
	}
	fmt.Fprintf(&sb, "\tlog {\n\t\tlevel ERROR\n\t}\n}\nhttp://127.0.0.1:%d {\n%s\n}", port, strings.Trim(site, "\n"))
	return sb.String()
}

// rig is a Caddy started by startRig.
type rig struct {
	child   *exec.Cmd
	base    string // http://127.0.0.1:port
	client  *http.Client
	storage string // its storage directory, "" for none
}

// startRig launches Caddy (see launch) on a free port with the caddyfile of
// global and site, and its storage in a new temporary directory named after
// storage, or none if storage is empty. The cleanup stops Caddy, then
// removes the directory.
func startRig(storage, global, site string, concurrency int, probe string) (rig, func(), error) {
	var r rig
	if storage != "" {
		dir, err := os.MkdirTemp("", storage)
		if err != nil {
			return rig{}, nil, err
		}
		r.storage = dir
	}
	remove := func() { os.RemoveAll(r.storage) } // nothing for ""
	port, err := freePort()
	if err != nil {
		remove()
		return rig{}, nil, err
	}
	var stop func()
	r.child, r.base, r.client, stop, err = launch(caddyfile(r.storage, port, global, site), port, concurrency, probe)
	if err != nil {
		remove()
		return rig{}, nil, err
	}
	return r, func() { stop(); remove() }, nil
}
