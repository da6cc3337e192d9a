// Command demo runs caddy-batch in front of a small legacy users API, both in
// one process: the API on 127.0.0.1:9001, Caddy with the batch module on
// :8080. From the repository root:
//
//	go run ./examples/demo                            # examples/Caddyfile
//	go run ./examples/demo -config examples/caddy.json
//	go run ./examples/demo -api-only                  # just the API, for a caddy binary built with xcaddy
package main

import (
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-batch/batch"
	"github.com/caddy-batch/batch/examples/legacyapi"
)

func main() {
	config := flag.String("config", "examples/Caddyfile", "Caddy config to run: a Caddyfile, or JSON if it ends in .json")
	apiAddr := flag.String("api", "127.0.0.1:9001", "address of the legacy API")
	apiOnly := flag.Bool("api-only", false, "run only the legacy API")
	flag.Parse()

	ln, err := net.Listen("tcp", *apiAddr)
	if err != nil {
		log.Fatalf("legacy API: %v", err)
	}
	api := &http.Server{Handler: legacyapi.New(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := api.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			log.Fatalf("legacy API: %v", err)
		}
	}()
	log.Printf("legacy users API on http://%s", *apiAddr)

	if *apiOnly {
		fmt.Println("legacy API ready; Ctrl-C stops it")
	} else {
		if err := runCaddy(*config); err != nil {
			log.Fatal(err)
		}
		fmt.Print(`
caddy-batch demo ready on http://localhost:8080 (Ctrl-C stops it); try:

  curl -s localhost:8080/batch -H 'Content-Type: application/json' -d '[
    {"method":"POST","path":"/users","body":{"name":"Alice"}},
    {"method":"GET","path":"/users"}]'

`)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
	if !*apiOnly {
		_ = caddy.Stop()
	}
	_ = api.Close()
}

// runCaddy starts Caddy in this process with the config file at path.
func runCaddy(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if filepath.Ext(path) != ".json" {
		var warnings []caddyconfig.Warning
		raw, warnings, err = caddyconfig.GetAdapter("caddyfile").Adapt(raw, map[string]any{"filename": path})
		if err != nil {
			return fmt.Errorf("adapting %s: %w", path, err)
		}
		for _, w := range warnings {
			log.Printf("%s", w)
		}
	}
	if err := caddy.Load(raw, true); err != nil {
		return fmt.Errorf("starting caddy: %w", err)
	}
	return nil
}
