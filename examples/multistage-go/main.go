package main

import "fmt"

func main() {
	fmt.Println("Hello, Docker Multi-Stage Build!")
}
